"""The training loop: loss goes down, optimizers and inits, determinism, resume, checkpoints, data errors."""

import json

import numpy as np
import pytest
import torch

from dlpipe.runtime.errors import DataNotFoundError, InputError
from dlpipe.training import data as datasets
from dlpipe.training.checkpoint import load_checkpoint, model_from_checkpoint
from dlpipe.training.registry import get_spec
from dlpipe.training.train import OPTIMIZERS, TrainConfig, build_optimizer, init_weights, train, train_one_epoch


def _batches(data_dir, n=512, batch=32):
    info = datasets.get_dataset("mnist")
    images, labels = datasets.load_split("mnist", "train", data_dir, limit=n)
    ds = datasets.ImageTensorDataset(datasets.to_nchw(images), torch.from_numpy(labels), info)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                                       collate_fn=datasets.batch_collate)


@pytest.mark.parametrize("name", ["dmlp", "lenet5", "deep_convnet", "resnet_small"])
def test_a_few_steps_lower_the_loss(name, data_dir):
    torch.manual_seed(0)
    model = get_spec(name).build(in_channels=1, image_size=[28, 28], num_classes=10)
    init_weights(model, "he")
    loader = _batches(data_dir)
    x, y = next(iter(loader))
    model.eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(x), y).item()
    opt = build_optimizer("adam", model.parameters(), 1e-3, 0.9, 0.0)
    for _ in range(3):
        train_one_epoch(model, loader, opt)
    model.eval()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_takes_a_step(name):
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    opt = build_optimizer(name, model.parameters(), 0.1, 0.9, 1e-4)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_unknown_optimizer_and_schedule_are_clear_errors():
    with pytest.raises(InputError, match="unknown optimizer 'adamax'"):
        train(TrainConfig(model="dmlp", dataset="shapes", optimizer="adamax"))
    with pytest.raises(InputError, match="unknown schedule"):
        train(TrainConfig(model="dmlp", dataset="shapes", schedule="warm"))


@pytest.mark.parametrize("scheme,gain", [("he", 2.0), ("xavier", None), ("lecun", 1.0)])
def test_weight_init_scale(scheme, gain):
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 300)
    init_weights(layer, scheme)
    std = layer.weight.std().item()
    expected = np.sqrt(2.0 / (400 + 300)) if gain is None else np.sqrt(gain / 400)
    assert abs(std - expected) / expected < 0.05
    assert torch.count_nonzero(layer.bias) == 0


def _tiny(tmp_path, name="run", **kw):
    # recipe plain (constant rate): under cosine a first part run with --epochs 1 ends at rate 0, unlike 2 straight
    cfg = dict(model="dmlp", dataset="shapes", recipe="plain", out=str(tmp_path / name), epochs=2, limit=400,
               test_limit=100, batch_size=64, progress=False, seed=7)
    cfg.update(kw)
    return train(TrainConfig(**cfg))


def test_same_seed_same_weights_and_resume_continues_exactly(tmp_path):
    a = _tiny(tmp_path, "a")
    b = _tiny(tmp_path, "b")
    sa, sb = load_checkpoint(a["last"])["state_dict"], load_checkpoint(b["last"])["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # One epoch, then resume for the second: the same weights as two epochs straight.
    _tiny(tmp_path, "c", epochs=1)
    c = _tiny(tmp_path, "c", epochs=2, resume=str(tmp_path / "c" / "last.pt"))
    sc = load_checkpoint(c["last"])["state_dict"]
    assert all(torch.allclose(sa[k], sc[k]) for k in sa)
    log = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]


def test_checkpoint_rebuilds_the_model_from_the_file_alone(tmp_path):
    result = _tiny(tmp_path, epochs=1)
    ckpt = load_checkpoint(result["best"])
    assert ckpt["model"] == "dmlp" and ckpt["model_args"]["in_channels"] == 3
    assert ckpt["dataset"]["labels"][0] == "circle"
    assert ckpt["examples"].shape[1:] == (3, 32, 32)
    model = model_from_checkpoint(ckpt)
    assert model(ckpt["examples"][:2]).shape == (2, 6)
    assert 0 <= ckpt["metrics"]["test_acc"] <= 1


def test_model_arguments_reach_the_builder_and_the_checkpoint(tmp_path):
    result = _tiny(tmp_path, epochs=1, model_args={"hidden": [24, 12]})
    ckpt = load_checkpoint(result["best"])
    assert ckpt["model_args"]["hidden"] == [24, 12]
    widths = [m.out_features for m in model_from_checkpoint(ckpt).modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [24, 12, 6]


@pytest.mark.parametrize("model_args, message", [
    ({"hiden": [8]}, "dmlp takes no model argument 'hiden'; it takes batch_norm, dropout, hidden"),
    ({"num_classes": 3}, "'num_classes' is set from the dataset"),
    ({"hidden": "wide"}, "cannot build dmlp with model arguments"),
])
def test_bad_model_arguments_are_clear_errors(tmp_path, model_args, message):
    with pytest.raises(InputError, match=message):
        _tiny(tmp_path, epochs=1, model_args=model_args)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_early_stopping_stops(tmp_path):
    result = _tiny(tmp_path, epochs=6, patience=1, lr=10.0, optimizer="sgd")  # a hopeless lr never improves
    assert len(result["history"]) < 6


@pytest.mark.parametrize("augment", datasets.AUGMENTATIONS)
def test_augmentations_keep_shape_and_dtype(augment):
    info = datasets.get_dataset("shapes")
    images, labels = datasets.load_split("shapes", "train", limit=8)
    ds = datasets.ImageTensorDataset(datasets.to_nchw(images), torch.from_numpy(labels), info,
                                     datasets.augmentation(augment, info.image_size))
    torch.manual_seed(0)
    x, y = ds.__getitems__(list(range(8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    plain, _ = datasets.ImageTensorDataset(datasets.to_nchw(images), torch.from_numpy(labels), info
                                           ).__getitems__(list(range(8)))
    assert torch.equal(x, plain) == (augment == "none")  # an augmentation changes the images, none does not


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        datasets.load_split("mnist", "train", tmp_path)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)
    assert "--data-dir" in str(err.value) and "--download" in str(err.value)


def test_fashion_mnist_loads(data_dir):
    images, labels = datasets.load_split("fashion-mnist", "test", data_dir, limit=50)
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8 and labels.max() < 10


def test_training_preprocessing_equals_the_runtime_preprocessing(data_dir):
    from dlpipe.runtime.images import preprocess
    from dlpipe.runtime.metadata import ModelInfo

    info = datasets.get_dataset("mnist")
    images, _ = datasets.load_split("mnist", "test", data_dir, limit=4)
    train_side = datasets.normalize(datasets.to_nchw(images), info).numpy()
    meta = ModelInfo.from_json(json.dumps({"task": "classification", "preprocessing": info.preprocessing()}))
    assert np.allclose(preprocess(list(images), meta.preprocessing), train_side, atol=1e-5)


def test_init_from_copies_matching_weights_and_refuses_an_unrelated_checkpoint(tmp_path):
    from dlpipe.runtime.errors import ModelFileError
    from dlpipe.training.checkpoint import load_checkpoint
    from dlpipe.training.loop import TrainConfig, load_matching
    from dlpipe.training.registry import get_spec
    from dlpipe.training.tasks.classification import train

    first = train(TrainConfig(model="lenet5", dataset="shapes", epochs=1, limit=256, test_limit=64, out=str(tmp_path / "a"),
                              progress=False, threads=1))
    source = load_checkpoint(first["best"])
    model = get_spec("lenet5").build(**source["model_args"])
    names = load_matching(model, first["best"])
    assert set(names) == set(source["state_dict"])
    for name in names:
        assert torch.equal(model.state_dict()[name], source["state_dict"][name])
    other = get_spec("dmlp").build(**{**source["model_args"]})
    with pytest.raises(ModelFileError, match="no weights of the same names"):
        load_matching(other, first["best"])
