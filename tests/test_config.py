"""Config validation and the CLI's one-line errors (no MPI needed)."""

import numpy as np
import pytest

from hvdtrain import config
from hvdtrain.cli import main
from hvdtrain.errors import ConfigError
from conftest import REPO, hvdtrain


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config.load(str(path))


def test_overrides_are_typed_and_nested():
    cfg = config.load(str(REPO / "configs/digits-torch.yaml"),
                      ["train.batch_size=7", "model.name=mlp", "train.scale_lr=false", "data.synthetic_shape=[3,4]"])
    assert cfg.train.batch_size == 7 and cfg.model.name == "mlp" and cfg.train.scale_lr == "none"
    assert cfg.data.synthetic_shape == [3, 4]


@pytest.mark.parametrize("override, expected", [
    ("train.batchsize=3", "train.batchsize: unknown key"),
    ("train.batch_size=abc", "train.batch_size:"),
    ("train.batch_size=-4", "train.batch_size: Input should be greater than 0"),
    ("model.name=transformer", "model.name:"),
    ("data.source=npz:/nonexistent/data.npz", "data.source: /nonexistent/data.npz: file not found"),
    ("compression.momentum_correction=true", "compression.momentum_correction: needs compression.method topk"),
    ("compression.auto_recheck_every=10", "compression.auto_recheck_every: must be at least 4 x auto_trial_steps"),
])
def test_bad_input_is_one_line_exit_2(override, expected, tmp_path, capsys):
    code = main(["train", "--config", str(REPO / "configs/digits-torch.yaml"),
                 "--run-dir", str(tmp_path), override])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file_names_it(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML at line"):
        config.load(str(bad))


def test_npz_missing_array_is_reported(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((4, 8, 8), np.float32))
    from hvdtrain.data import load_arrays
    cfg = config.load(None, [f"data.source=npz:{path}"])
    with pytest.raises(ConfigError, match=r"missing array\(s\) \['y'\]"):
        load_arrays(cfg.data, 0)


def test_console_script_error_has_no_traceback(tmp_path):
    proc = hvdtrain("train", "--config", str(REPO / "configs/digits-torch.yaml"),
                    "--run-dir", str(tmp_path), "train.batch_size=-1", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"hvdtrain: error: {REPO / 'configs/digits-torch.yaml'}: train.batch_size: Input should be greater than 0 (got -1)"]


def test_auto_exchange_overlaps_on_gpus_and_over_gloo_and_stays_flat_over_mpi_on_cpu(monkeypatch):
    from hvdtrain.runtime import exchange_mode

    def mode(*overrides: str, gpu: bool = False, gloo: bool = False) -> str:
        return exchange_mode(config.load(None, list(overrides)), gpu, gloo)

    monkeypatch.delenv("HOROVOD_ELASTIC", raising=False)
    assert mode() == "flat"  # Open MPI on a CPU node: its polling would take backward's cores
    assert mode(gloo=True) == mode(gpu=True) == "overlap"
    assert mode("compression.method=topk", gloo=True) == "flat"  # sparse methods need the flat buffer
    assert mode("compression.method=bf16", gpu=True) == "flat"
    assert mode("compression.method=fp16", gloo=True) == "overlap"
    assert mode("horovod.gradient_exchange=flat", gloo=True) == "flat"
    assert mode("horovod.gradient_exchange=overlap") == "overlap"
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    assert mode(gloo=True) == "flat"  # elastic jobs resize the flat exchange
