"""Model files: lossless round trip, atomic writes, and refusal of anything malformed."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from goodnet.artifacts import (
    CARD_KEY,
    ModelCard,
    atomic_path,
    load_model,
    read_card,
    save_model,
    write_text_atomic,
)
from goodnet.errors import GoodnetError
from goodnet.models import build_model, spec_for_data


@pytest.fixture()
def saved(tmp_path, stripes_train):
    spec = spec_for_data("small_cnn", stripes_train)
    model = build_model(spec, seed=1)
    card = ModelCard(spec=spec, attack={"name": "badnets", "config": {"target": 1}},
                     metrics={"clean_accuracy": 0.5}, seed=1, data=stripes_train.name)
    path = save_model(tmp_path / "m.safetensors", model, card,
                      extras={"scores": torch.tensor([1.0, 0.0])})
    return path, model, card


def test_round_trip(saved, stripes_train, monkeypatch):
    path, model, card = saved
    # Loading must not unpickle anything.
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    loaded = load_model(path)
    assert loaded.card == card
    x, _ = stripes_train.get(torch.arange(8))
    assert torch.equal(loaded.model(x), model.eval()(x))
    assert torch.equal(loaded.extras["scores"], torch.tensor([1.0, 0.0]))
    assert read_card(path).spec == card.spec


def test_card_is_plain_json_in_the_safetensors_header(saved):
    from safetensors import safe_open

    path, _, _ = saved
    with safe_open(str(path), "pt") as handle:
        body = json.loads(handle.metadata()[CARD_KEY])
    assert body["spec"]["arch"] == "small_cnn" and body["seed"] == 1
    assert body["format"] == "goodnet-model"


def test_truncated_file_is_refused(saved, tmp_path):
    path, _, _ = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GoodnetError, match=r"cut\.safetensors"):
        load_model(cut)


def test_absurd_header_size_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    with pytest.raises(GoodnetError, match="declared header"):
        load_model(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(GoodnetError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(GoodnetError, match="is a folder"):
        load_model(tmp_path)


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(GoodnetError):
        load_model(path)
    assert not marker.exists()


def test_foreign_safetensors_without_card_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(GoodnetError, match="without a goodnet model card"):
        load_model(path)


def _rewrite(path, tensors, card_text):
    save_file(tensors, str(path), metadata={CARD_KEY: card_text})


def test_bad_cards_and_weights_are_refused(saved, tmp_path):
    _, model, card = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cases = {
        "unknown architecture": card.to_json().replace('"small_cnn"', '"evil_net"'),
        "not valid JSON": "{oops",
        "not a goodnet model card": json.dumps({"format": "other"}),
        "2 to 100,000 classes": card.to_json().replace('"num_classes": 4',
                                                       '"num_classes": 10000000'),
    }
    for message, text in cases.items():
        bad = tmp_path / "bad.safetensors"
        _rewrite(bad, state, text)
        with pytest.raises(GoodnetError, match=message):
            load_model(bad)
    nan_state = dict(state, **{"fc2.bias": torch.full_like(state["fc2.bias"], float("nan"))})
    _rewrite(tmp_path / "nan.safetensors", nan_state, card.to_json())
    with pytest.raises(GoodnetError, match="NaN or infinite"):
        load_model(tmp_path / "nan.safetensors")
    wrong = dict(state, **{"fc2.bias": torch.zeros(7)})
    _rewrite(tmp_path / "shape.safetensors", wrong, card.to_json())
    with pytest.raises(GoodnetError, match="has shape"):
        load_model(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in state.items() if k != "fc2.bias"}
    _rewrite(tmp_path / "missing.safetensors", missing, card.to_json())
    with pytest.raises(GoodnetError, match="weights missing"):
        load_model(tmp_path / "missing.safetensors")


def test_failed_write_leaves_the_previous_file_and_no_debris(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_unwritable_destination_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GoodnetError, match="cannot write"):
        write_text_atomic(blocker / "sub" / "out.txt", "x")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.md", "x")
        (tmp_path / "plain.md").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "report.md").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.md").stat().st_mode)
