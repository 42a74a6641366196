"""bench/serve_speed.py on the CPU with a tiny model (``--tiny``): the script serves over HTTP, drives its clients in
a subprocess and reports what it says for every server and concurrency (times are not asserted)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


import serve_speed  # noqa: E402

pytestmark = pytest.mark.slow


def test_serve_speed_runs_on_cpu(tmp_path):
    out = tmp_path / "serve.json"
    rows = serve_speed.main(["--tiny", "--streams", "1", "3", "--prompt-len", "16", "--new-tokens", "5",
                             "--sequential", "2", "--one-row-clients", "2", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert [(r["server"], r["clients"], r["requests"]) for r in rows] == [
        ("batched (3 rows)", 1, 1), ("batched (3 rows)", 3, 3),
        ("batched (3 rows), one request at a time", 1, 2), ("one row (1 rows)", 2, 2)]  # fmt: skip
    for r in rows:
        assert r["requests"] <= r["tokens"] <= 5 * r["requests"], r
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["wall_s"]
        assert r["aggregate_tok_s"] == pytest.approx(r["tokens"] / r["wall_s"])
    assert out.with_suffix(".md").read_text().count("\n") == len(rows) + 2
