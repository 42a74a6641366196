import json

import pytest

from glmtune.models.config import ConfigError, GLMConfig, preset

# The released config.json files, as THUDM ships them (fields that matter to the architecture).
CHATGLM3_6B = {
    "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
    "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "use_cache": True,
    "torch_dtype": "float16", "transformers_version": "4.30.2", "tie_word_embeddings": False, "eos_token_id": 2,
    "pad_token_id": 0,
}  # fmt: skip
GLM4_9B = dict(CHATGLM3_6B, num_layers=40, padded_vocab_size=151552, seq_length=131072, rope_ratio=500,
               layernorm_epsilon=1.5625e-07, torch_dtype="bfloat16", eos_token_id=[151329, 151336, 151338],
               pad_token_id=151329)  # fmt: skip
CHATGLM_6B = {
    "_name_or_path": "THUDM/chatglm-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
    "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
    "max_sequence_length": 2048, "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True,
    "torch_dtype": "float16", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": 130528,
    "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False,
}  # fmt: skip


@pytest.mark.parametrize("raw", [CHATGLM3_6B, GLM4_9B, CHATGLM_6B], ids=["chatglm3", "glm4", "chatglm-v1"])
def test_round_trip_keeps_every_key_and_value(raw, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    cfg = GLMConfig.from_json(path)
    out = cfg.to_dict()
    for key, value in raw.items():
        assert out[key] == value, key
    cfg.to_json(tmp_path / "again.json")
    assert GLMConfig.from_json(tmp_path / "again.json") == cfg


def test_fields_read():
    cfg = GLMConfig.from_dict(GLM4_9B)
    assert cfg.arch == "chatglm"
    assert (cfg.num_layers, cfg.head_dim, cfg.num_kv_heads, cfg.rope_ratio) == (40, 128, 2, 500)
    assert cfg.qkv_size == 4096 + 2 * 2 * 128
    v1 = GLMConfig.from_dict(CHATGLM_6B)
    assert v1.arch == "glm"
    assert (v1.padded_vocab_size, v1.ffn_hidden_size, v1.seq_length, v1.head_dim) == (130528, 16384, 2048, 128)
    assert (v1.rmsnorm, v1.add_bias_linear, v1.tie_word_embeddings) == (False, True, True)
    assert "num_layers" in v1.to_dict() and "padded_vocab_size" not in v1.to_dict()


def test_presets_match_released_configs():
    for name, raw in [("chatglm3-6b", CHATGLM3_6B), ("glm-4-9b-chat", GLM4_9B), ("chatglm-6b", CHATGLM_6B)]:
        p, r = preset(name), GLMConfig.from_dict(raw)
        for f in (
            "arch",
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "head_dim",
            "num_kv_heads",
            "padded_vocab_size",
            "rope_ratio",
            "rmsnorm",
            "add_qkv_bias",
            "add_bias_linear",
        ):
            assert getattr(p, f) == getattr(r, f), (name, f)  # fmt: skip
    with pytest.raises(KeyError, match="unknown preset"):
        preset("chatglm5")


def test_unknown_model_type_names_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(CHATGLM3_6B, model_type="llama")))
    with pytest.raises(ConfigError, match=r"config\.json: field 'model_type' is 'llama'"):
        GLMConfig.from_json(path)


@pytest.mark.parametrize("missing", ["num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"])
def test_missing_required_field(missing, tmp_path):
    raw = dict(CHATGLM3_6B)
    del raw[missing]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"config.json: missing required field '{missing}'"):
        GLMConfig.from_json(path)


def test_v1_missing_field_uses_v1_name():
    raw = dict(CHATGLM_6B)
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="missing required field 'vocab_size'"):
        GLMConfig.from_dict(raw, source="x/config.json")


def test_wrong_type_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="field 'num_layers' should be"):
        GLMConfig.from_dict(dict(CHATGLM3_6B, num_layers="28"))
    with pytest.raises(ConfigError, match="field 'multi_query_group_num' must divide"):
        GLMConfig.from_dict(dict(CHATGLM3_6B, multi_query_group_num=3))
    with pytest.raises(ConfigError, match="field 'pre_seq_len'"):
        GLMConfig.from_dict(dict(CHATGLM3_6B, pre_seq_len=0))


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "chatglm",\n  "num_layers": ,\n}')
    with pytest.raises(ConfigError, match="config.json: line 3: invalid JSON"):
        GLMConfig.from_json(path)
    with pytest.raises(ConfigError, match="no such file"):
        GLMConfig.from_json(tmp_path / "nope")
