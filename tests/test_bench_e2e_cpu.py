"""`dynsnap bench e2e` on the CPU with the tiny reference worker: every row restores a worker that gives the cold
start's greedy tokens, and the table and plot are produced (needs torch and transformers: skipped without)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="bench e2e's reference worker needs torch (an optional extra)")
pytest.importorskip("transformers", reason="bench e2e's reference worker needs transformers (an optional extra)")

pytestmark = [pytest.mark.criu]


def test_stock_and_dynsnap_rows_restore_the_same_tokens(tmp_path, home):
    from dynsnap_core.bench import e2e as bench_e2e
    res = bench_e2e.run("tiny", device="cpu", kv_gb=0.05, dir=str(tmp_path), cold=False, max_new=8,
                        rows=["stock criu + driver, KV freed", "dynsnap, KV released"])
    assert [(r["row"], r["cache"]) for r in res["rows"]] == [("stock criu + driver, KV freed", "warm"),
                                                            ("dynsnap, KV released", "warm")]
    assert len(res["cold_start"]["tokens"]) == 8
    for r in res["rows"]:
        assert r["tokens_match"] and r["released_bytes"] == 50_000_000 and r["image_bytes"] > 0, r
    table = bench_e2e.format_table(res)
    assert "dynsnap, KV released             warm" in table and table.count(" yes") == 2
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    png = bench_e2e.plot(res, str(tmp_path / "e2e.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
