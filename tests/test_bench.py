"""Benchmarks run for real at a tiny size: every rank reports, the report and its plots are written."""
import json

from conftest import hvdtrain


def test_scaling_allreduce_and_report(tmp_path):
    out = tmp_path / "results"
    hvdtrain("bench", "scaling", "--np", "1,2", "--modes", "horovod,horovod-default,ddp,nocomm", "--repeats", "1",
             "--steps", "4", "--warmup", "1", "--model", "mlp", "--shape", "1", "8", "8", "--out", str(out),
             timeout=600)
    hvdtrain("bench", "allreduce", "--np", "2", "--impls", "horovod-mpi,horovod-gloo,mpi4py,torch-gloo",
             "--sizes", "0.01,1,2", "--out", str(out), timeout=600)
    done = hvdtrain("bench", "report", str(out))
    assert "report.md" in done.stdout

    scaling = json.loads((out / "scaling.json").read_text())
    rows = {(r["mode"], r["ranks"]): r for r in scaling["rows"]}
    assert set(rows) == {(m, n) for m in ("horovod", "horovod-default", "ddp", "nocomm") for n in (1, 2)}
    for (mode, ranks), row in rows.items():
        assert len(row["per_rank_samples_per_s"]) == ranks  # measured on every rank, not extrapolated
        assert row["samples_per_s"] > 0 and row["efficiency"] > 0
    assert scaling["settings"]["horovod_env"]["HOROVOD_CYCLE_TIME"] == "5"

    report = json.loads((out / "report.json").read_text())
    assert {a["impl"] for a in report["allreduce"]} == {"horovod-mpi", "horovod-gloo", "mpi4py", "torch-gloo"}
    assert all(r["bus_gb_s"] > 0 and r["memcpy_gb_s"] > 0 for a in report["allreduce"] for r in a["rows"])
    assert report["projection"]["link"]["beta_bytes_per_s"] > 0
    assert len(report["projection"]["efficiency"]["dense"]) == len(report["projection"]["ranks"])
    for plot in ("scaling.png", "comparison.png", "allreduce.png", "projection.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| hvdtrain (Horovod, tuned) | 2 |" in markdown and "## Scale-out projection" in markdown
    assert report["machine"]["cores"] >= 1 and "horovod" in report["machine"]["versions"]
