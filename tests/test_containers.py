"""Apptainer definitions, checked statically (Apptainer cannot be installed on the CI machines).

What the images run at build time is scripts/setup.sh, which `make setup` runs on every CI run.
"""
import re

import pytest
from spython.main.parse.parsers import SingularityParser

from conftest import REPO

DEFINITIONS = sorted((REPO / "containers").glob("*.def"))
REQUIRED = ["labels", "help", "files", "environment", "post", "runscript", "test"]


def parse(definition):
    return SingularityParser(str(definition)).recipe["spython-base"]


def test_there_is_a_cpu_and_a_gpu_image():
    assert [d.name for d in DEFINITIONS] == ["hvdtrain-cpu.def", "hvdtrain-gpu.def"]


@pytest.mark.parametrize("definition", DEFINITIONS, ids=lambda p: p.name)
def test_definition_structure(definition):
    text = definition.read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("Bootstrap: docker") and lines[1].startswith("From: "), "header must come first"
    sections = re.findall(r"^%(\w+)", text, flags=re.M)
    assert sorted(sections) == sorted(REQUIRED) and len(sections) == len(set(sections))

    recipe = parse(definition)
    assert recipe.fromHeader == lines[1].split(":", 1)[1].strip()
    assert recipe.files == [". /opt/hvdtrain"]
    assert "PATH=/opt/hvdtrain/venv/bin:$PATH" in recipe.environ and "TF_USE_LEGACY_KERAS=1" in recipe.environ
    install = "\n".join(recipe.install)  # spython folds %test into the install steps as /tests.sh
    assert "bash /opt/hvdtrain/scripts/setup.sh" in install
    assert recipe.cmd == 'exec hvdtrain "$@"'
    assert "horovodrun --check-build" in install and "hvdtrain train" in install and recipe.test


def test_the_script_the_images_run_is_the_one_ci_runs():
    assert (REPO / "scripts/setup.sh").is_file()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^setup:\n\tbash scripts/setup.sh$", makefile, flags=re.M)
    assert "make test" in (REPO / ".ci/run").read_text()
    assert re.search(r"^test: setup$", makefile, flags=re.M)


def test_gpu_image_builds_horovod_with_nccl_on_its_own_torch():
    install = "\n".join(parse(REPO / "containers/hvdtrain-gpu.def").install)
    for setting in ("HOROVOD_GPU_OPERATIONS=NCCL", "HVDTRAIN_TORCH_SPEC=keep", "HVDTRAIN_VENV_SYSTEM_SITE=1"):
        assert setting in install
    setup = (REPO / "scripts/setup.sh").read_text()
    for variable in ("HOROVOD_GPU_OPERATIONS", "HVDTRAIN_TORCH_SPEC", "HVDTRAIN_VENV_SYSTEM_SITE", "HVDTRAIN_VENV"):
        assert variable in setup
