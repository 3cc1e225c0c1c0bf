"""The benchmark's sections run from a clean checkout and agree with each other (timings are never asserted)."""
from __future__ import annotations

from conftest import TINY

from bench import run as bench


def test_bench_sections_run_and_render(tmp_path):
    root, tree = tmp_path / "root-B", tmp_path / "seed-tree"
    B, _ = bench.worker("steps", {"data": str(TINY), "root": str(root)}, tmp_path / "B")
    A0, _ = bench.worker("extract", {"data": str(TINY), "dest": str(tree)}, tmp_path / "A0")
    A, proc = bench.worker("seed", {"base": str(tree / B["layout_base"])}, tmp_path / "A")
    assert A["accuracy"] == B["accuracy"]  # the seed script and pixelsim agree to the bit
    assert set(B["steps"]) == {"download", "untar", "convert", "templates", "evaluate", "report"}
    F, _ = bench.worker("decode", {"root": str(root), "seed_tree": str(tree), **B}, tmp_path / "F")
    assert F["same_pixels"] and F["images"] == sum(B["shards"]["counts"]["train"].values())
    J, _ = bench.worker("jpeg", {"n": 20}, tmp_path / "J")
    assert J["images"] == 20 and J["diff_mean"] < 6 and set(J["rate"]) == {"exact", "draft"}
    G = bench.scale(3000, tmp_path, tmp_path)
    assert "error" not in G, G.get("error")
    assert {k: round(v["rate"] * v["s"]) for k, v in G["steps"].items()} == {
        "untar": 3000, "convert": 3000, "templates": 2500, "evaluate": 500,
        "untar, grown 1%": 3030, "convert, grown 1% (incremental)": 3030}
    # the one 2,500-image training shard is reused; the 500-image validation shard is under a
    # quarter of --shard-size (5000), so it is decoded again with the 30 new images
    assert G["incremental"] == {"images": 3030, "decoded": 530}
    assert set(G["limit_s"]) == {"untar", "convert", "templates", "evaluate"}
    R = {"machine": bench.machine(), "A": {**A, "process_s": proc["wall"]}, "A0": A0, "B": B, "F": F, "J": J,
         "G": {"runs": [G], "flat": True, "notes": []}, "accuracy_equal": True, "accuracy_equal_C": {}}
    text = bench.table(R)
    for row in ("| A | seed extraction (tarfile.extractall", "| B | all steps (download → report)",
                "| B | from the unpacked archive", "| F | train images: shards → one array",
                "| dec | B convert throughput", "| 3,000 | convert", "| 3,000 | grown 1%: images decoded again | 530 of 3,030",
                "| J | 20 JPEGs of 240-640 px"):
        assert row in text, row
    assert "A equals pixelsim (B, exact): **True**" in text
