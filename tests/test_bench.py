"""Benchmarks run for real at a tiny size: every rank reports, the report and its plots are written."""
import json
import os

import pytest

from conftest import hvdtrain


def test_allreduce_gap_and_open_mpi_parameters_reach_the_ranks(tmp_path):
    out = tmp_path / "tail"
    hvdtrain("bench", "allreduce", "--np", "2", "--impls", "mpi4py,horovod-mpi", "--sizes", "0.01", "--gap-ms", "2",
             "--repeats", "7", "--mca", "coll_tuned_use_dynamic_rules=1", "--mca", "coll_tuned_allreduce_algorithm=3",
             "--out", str(out), timeout=300)
    for impl in ("mpi4py", "horovod-mpi"):
        result = json.loads((out / "raw" / f"allreduce-{impl}-np2.json").read_text())
        assert result["ompi_mca"]["OMPI_MCA_coll_tuned_allreduce_algorithm"] == "3", impl
        assert result["ompi_mca"]["OMPI_MCA_coll_tuned_use_dynamic_rules"] == "1", impl
        assert result["gap_ms"] == 2
        row = result["rows"][0]
        assert 0 < row["seconds"] <= row["max_seconds"] and row["seconds"] * 0.5 < row["mean_seconds"] <= row["max_seconds"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the 1gbit link needs root to create network namespaces and tc caps")
def test_scaling_allreduce_and_report(tmp_path):
    out = tmp_path / "results"
    hvdtrain("bench", "scaling", "--np", "1,2", "--modes", "horovod,horovod-gloo,horovod-default,ddp,nocomm", "--repeats", "1",
             "--steps", "4", "--warmup", "1", "--model", "mlp", "--shape", "1", "8", "8", "--out", str(out),
             "--timeline", "--links", "loopback,1gbit", timeout=900)
    hvdtrain("bench", "allreduce", "--np", "2", "--impls", "horovod-mpi,horovod-gloo,mpi4py,torch-gloo",
             "--sizes", "0.01,1,2", "--links", "loopback,1gbit", "--out", str(out), timeout=600)
    # what compression.method=fp16 sends; MPI has no float16 sum, so mpi4py is left out
    half = hvdtrain("bench", "allreduce", "--np", "2", "--impls", "horovod-gloo,torch-gloo,mpi4py", "--dtype", "float16",
                    "--sizes", "0.01,1,2", "--out", str(out), timeout=300)
    assert "mpi4py left out" in half.stdout and "float16: horovod-gloo / torch-gloo bus bandwidth" in half.stdout
    done = hvdtrain("bench", "report", str(out))
    assert "report.md" in done.stdout

    scaling = json.loads((out / "scaling.json").read_text())
    rows = {(r["mode"], r["link"], r["ranks"]): r for r in scaling["rows"]}
    modes = ("horovod", "horovod-gloo", "horovod-default", "ddp")
    assert set(rows) == {*((m, "loopback", n) for m in (*modes, "nocomm") for n in (1, 2)),
                         *((m, "1gbit", 2) for m in modes)}
    # horovod-gloo is hvdtrain's path over Gloo, on the namespace hosts too, where auto overlaps the exchange
    for name, collectives, exchange in (("horovod-gloo-np2", "gloo", "overlap"), ("horovod-gloo-1gbit-np2", "gloo", "overlap"),
                                        ("horovod-1gbit-np2", "mpi", "flat"), ("horovod-np2", "mpi", "flat")):
        for rank in (0, 1):
            ran = json.loads((out / "raw" / f"{name}-rep0-rank{rank}.json").read_text())
            assert (ran["collectives"], ran["exchange"]) == (collectives, exchange), name
    # over the capped link every communicating mode ran on the two namespace hosts, against its one-rank run
    assert all(rows[m, "1gbit", 2]["efficiency"] > 0 for m in ("horovod", "ddp"))
    assert {t["target"] for t in scaling["targets"]} >= {"np=1 hvdtrain / DDP", "np=2 over 1gbit hvdtrain / DDP"}
    for (mode, link, ranks), row in rows.items():
        assert len(row["per_rank_samples_per_s"]) == ranks  # measured on every rank, not extrapolated
        assert row["samples_per_s"] > 0 and row["efficiency"] > 0
    # Horovod's timeline, on request: its negotiation and allreduce of the flat gradient buffer
    timeline = (out / "timeline-horovod-np2.json").read_text()
    assert "NEGOTIATE_ALLREDUCE" in timeline and "gradients.dense" in timeline
    # the first job, started before anything had created the out directory, and Horovod over Gloo
    assert (out / "timeline-horovod-np1.json").stat().st_size > 0
    assert "NEGOTIATE_ALLREDUCE" in (out / "timeline-horovod-gloo-np2.json").read_text()
    assert not (out / "timeline-ddp-np2.json").exists()
    assert scaling["settings"]["horovod_env"]["OMPI_MCA_mpi_yield_when_idle"] == "1"

    report = json.loads((out / "report.json").read_text())
    measured = {(a["impl"], a["link"]) for a in report["allreduce"]}
    # every implementation on every link, Horovod over Gloo and torch.distributed on the namespace hosts too
    assert measured == {(i, link) for i in ("horovod-mpi", "horovod-gloo", "mpi4py", "torch-gloo")
                        for link in ("loopback", "1gbit")}
    half = report["allreduce_float16"]
    assert {(a["impl"], a["dtype"]) for a in half} == {("horovod-gloo", "float16"), ("torch-gloo", "float16")}
    # the same bytes as the float32 sweep (twice the values)
    assert [r["bytes"] for r in half[0]["rows"]] == [r["bytes"] for r in report["allreduce"][0]["rows"]]
    assert "## float16 allreduce bus bandwidth" in (out / "report.md").read_text()
    assert all(r["bus_gb_s"] > 0 and r["memcpy_gb_s"] > 0 for a in report["allreduce"] for r in a["rows"])
    links = report["projection"]["links"]
    assert links["loopback"]["beta_bytes_per_s"] > links["1gbit"]["beta_bytes_per_s"]
    # the tc cap is 125 MB/s; the fit over 1-2 MiB messages must find it (within a factor of 2)
    assert 6e7 < links["1gbit"]["beta_bytes_per_s"] < 2.5e8, links["1gbit"]
    assert len(links["1gbit"]["efficiency"]["dense"]) == len(links["1gbit"]["ranks"])
    for plot in ("scaling.png", "comparison.png", "allreduce.png", "projection.png", "projection-1gbit.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| hvdtrain (Horovod, tuned) | loopback | 2 |" in markdown and "## Scale-out projection over 1gbit" in markdown
    assert "2 ranks over 1gbit: hvdtrain relative to DDP" in markdown
    assert "2 ranks over 1gbit: hvdtrain over Gloo relative to DDP" in markdown
    assert report["machine"]["cores"] >= 1 and "horovod" in report["machine"]["versions"]


def test_time_to_accuracy_counts_each_epochs_steps_at_its_own_rate():
    from hvdtrain.bench.compression import BATCH, RANKS, reaching

    per_step = RANKS * BATCH  # samples
    epochs = [{"step": 45, "samples_per_s": per_step / 0.1, "test_accuracy": 0.80},   # 45 steps of 0.1 s
              {"step": 90, "samples_per_s": per_step / 0.02, "test_accuracy": 0.94},  # 45 of 0.02 s
              {"step": 135, "samples_per_s": per_step / 0.02, "test_accuracy": 0.96}]
    seconds, steps = reaching(epochs, bar=0.95)
    assert steps == 135 and seconds == pytest.approx(4.5 + 0.9 + 0.9)
    assert reaching(epochs, bar=0.99) is None
    assert reaching(epochs[:1], bar=0.5, ranks=1) == (pytest.approx(45 * 0.1 / 2), 45)


def test_compression_bench_against_ddp_on_loopback(tmp_path):
    out = tmp_path / "compression.json"
    done = hvdtrain("bench", "compression", "--links", "loopback", "--methods", "fp16", "--baselines", "ddp:none",
                    "--gloo", "none", "--epochs", "1", "--out", str(out), timeout=900)
    assert "compute floor:" in done.stdout and "none vs ddp:none" in done.stdout
    assert "gloo:none vs ddp:none" in done.stdout
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["links"]["loopback"]}
    assert set(rows) == {"none", "fp16", "gloo:none", "ddp:none"}
    # the same job with Horovod over Gloo, where auto overlaps the exchange; over MPI it stays flat
    assert (rows["gloo:none"]["horovod_collectives"], rows["gloo:none"]["gradient_exchange"]) == ("gloo", "overlap")
    assert (rows["none"]["horovod_collectives"], rows["none"]["gradient_exchange"]) == ("mpi", "flat")
    assert rows["gloo:none"]["bytes_per_step"] == pytest.approx(rows["none"]["bytes_per_step"], rel=0.01)
    for row in rows.values():
        assert row["step_ms"] > 0 and 0 < row["test_accuracy"] <= 1
    # the same model's gradient: fp16 hands the collectives half of fp32's bytes, DDP fp32 as many as none
    assert rows["fp16"]["bytes_per_step"] == pytest.approx(rows["none"]["bytes_per_step"] / 2, rel=0.01)
    assert rows["ddp:none"]["bytes_per_step"] == pytest.approx(rows["none"]["bytes_per_step"], rel=0.01)
    assert rows["ddp:none"]["weights_identical"]
    # one rank alone on one core: a step no exchange can beat
    assert 0 < result["floor"]["step_ms"]
    assert [r["elements"] for r in result["selection"]] == [1_000_000, 6_400_000, 25_000_000]
    assert (tmp_path / "compression-loopback.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {t["target"] for t in result["targets"]} >= {"loopback hvdtrain none step speed / ddp:none"}


def test_loader_bench_reads_every_batch_cold_and_warm_and_reports_each_pass(tmp_path):
    out = tmp_path / "loader.json"
    done = hvdtrain("bench", "loader", "--dir", str(tmp_path / "set"), "--size-gb", "0.02", "--workers", "0,1",
                    "--epochs", "2", "--naive-seconds", "0.5", "--out", str(out), timeout=300)
    report = json.loads(out.read_text())
    index = json.loads((tmp_path / "set/train/index.json").read_text())
    epoch = index["total"] // 32 * 32  # one rank's epoch in whole batches of 32
    for workers in (0, 1):
        name = f"hvdtrain shuffled, workers={workers}"
        cold, warm = report["results"]["cold"][name], report["results"]["warm"][name]
        assert cold["samples"] == epoch - 32 and warm["samples"] == 2 * epoch - 32  # the first batch is not timed
        assert len(warm["passes_samples_per_s"]) == 2 and min(warm["passes_samples_per_s"]) > 0
        if cold["resident_before"] is not None:
            assert cold["resident_before"] < 0.05  # evicted: the cold pass reads from the disk
        ratios = report["ratios"]["warm"][f"workers={workers}"]
        assert {"vs_limit", "vs_limit_after_first_pass", "vs_memcpy", "vs_naive_same_workers"} <= set(ratios)
    assert len(report["results"]["warm"]["sequential read"]["passes_samples_per_s"]) == 2
    # the cold limit is the faster of the sequential reads through and around the page cache (O_DIRECT,
    # where the file system takes it); warm, only the page cache's is a read of cached bytes
    cold = report["results"]["cold"]
    fastest = max((n for n in ("sequential read", "sequential read, O_DIRECT") if n in cold),
                  key=lambda n: cold[n]["samples_per_s"])
    assert report["limits"] == {"cold": fastest, "warm": "sequential read"}
    assert "sequential read, O_DIRECT" in cold or "sequential read, O_DIRECT: left out" in done.stdout
    assert {t["target"] for t in report["targets"]} >= {"cold workers=0 hvdtrain / sequential read",
                                                        "warm workers=1 hvdtrain / sequential read"}
    assert "after the first pass" in done.stdout
    # each loader is also set against as many parallel readers as it uses cores (copy threads in-process)
    from hvdtrain.shards.reader import copy_threads

    assert report["readers"] == {"workers=0": copy_threads(), "workers=1": 1}
    if copy_threads() > 1:
        warm = report["results"]["warm"]
        parallel = warm[f"sequential read, {copy_threads()} readers"]
        # every byte once per pass, less the untimed first block (4 MiB at most, of 3x64x64 float32)
        assert parallel["samples"] == pytest.approx(warm["sequential read"]["samples"], abs=(4 << 20) / 49152)
        assert len(parallel["passes_samples_per_s"]) == 2
        assert {"vs_same_readers", "vs_same_readers_after_first_pass"} <= set(report["ratios"]["warm"]["workers=0"])
        assert f"/ {copy_threads()} readers = " in done.stdout
