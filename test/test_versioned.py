"""Every versioned torch file (checkpoint, training state, text embeddings) is read by one
helper: a missing, damaged, foreign or future file is the same CheckpointError, worded the same
way, naming the file and the kind of file."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import CHECKPOINT_KIND, load_checkpoint
from clip2scene_core.clip.text_bank import EMBEDDINGS_KIND, load_text_embeddings
from clip2scene_core.errors import CheckpointError
from clip2scene_core.versioned import FileKind, load_versioned, save_versioned
from training.engine.state import STATE_KIND, load_state

KINDS = [(CHECKPOINT_KIND, load_checkpoint), (STATE_KIND, load_state),
         (EMBEDDINGS_KIND, load_text_embeddings)]


@pytest.mark.parametrize("kind,load", KINDS, ids=lambda k: getattr(k, "what", ""))
def test_bad_files_give_the_same_errors_for_every_kind(tmp_path, kind, load):
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    torch.save({"format": kind.format, "version": 99}, tmp_path / "future.pt")
    cases = {"absent.pt": rf"{kind.what} not found: .*absent\.pt",
             "trunc.pt": rf"trunc\.pt: {kind.what} is corrupt or not a torch file",
             "foreign.pt": rf"foreign\.pt: not a {kind.format} file",
             "future.pt": rf"future\.pt: {kind.what} format version 99 is not supported "
                          rf"\(this build reads version {kind.version}\)"}
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern):
            load(tmp_path / name)


def test_a_round_trip_checks_the_digest_and_required_keys(tmp_path):
    kind = FileKind("test-format", 3, "test file", required=("a",))
    save_versioned(tmp_path / "ok.pt", kind, {"a": F.normalize(torch.ones(2, 2), dim=1)})
    data, verified = load_versioned(tmp_path / "ok.pt", kind)
    assert verified and data["format"] == "test-format" and data["version"] == 3
    save_versioned(tmp_path / "lacks.pt", kind, {"b": 1})
    with pytest.raises(CheckpointError, match=r"lacks\.pt: test file lacks \['a'\]"):
        load_versioned(tmp_path / "lacks.pt", kind)
    data["a"] = data["a"] * 2                    # modified after it was written
    torch.save(data, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt: test file is damaged"):
        load_versioned(tmp_path / "edited.pt", kind)
