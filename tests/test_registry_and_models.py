"""The registry and the model builders."""

import pytest
import torch

from dlpipe.runtime.errors import DlpipeError, InputError
from dlpipe.training.registry import ModelSpec, get_spec, list_models, register_model

CLASSIFIERS = ["deep_convnet", "dmlp", "lenet5", "resnet_small"]


# Models every release ships, by task (the registry may hold more).
EXPECTED = {"classification": set(CLASSIFIERS) | {"torchvision", "alexnet", "vgg11", "vgg16", "googlenet"},
            "segmentation": {"fcn8s", "fcn2s"},
            "detection": {"rcnn"}, "captioning": {"captioner"}, "control": {"dqn-cartpole", "dqn-atari"},
            "stylization": {"stylizer"}}


def test_registry_lists_the_classifiers():
    names = list_models()
    assert len(names) == len(set(names)), names
    assert set(CLASSIFIERS) <= set(list_models("classification"))
    for name in names:  # every listed name resolves to the spec registered under that name
        assert get_spec(name).name == name


def test_list_models_by_task_partitions_the_registry():
    names = list_models()
    tasks = {get_spec(n).task for n in names}
    assert set(EXPECTED) <= tasks, tasks
    by_task = {task: list_models(task=task) for task in tasks}
    for task, members in by_task.items():
        assert members and all(get_spec(n).task == task for n in members), (task, members)
        assert EXPECTED.get(task, set()) <= set(members), (task, members)
    # every model in exactly one task: the parts are disjoint and their union is the whole registry
    assert sum(len(m) for m in by_task.values()) == len(names)
    assert set().union(*by_task.values()) == set(names)
    assert list_models(task="no-such-task") == []


def test_unknown_model_is_a_clear_error():
    with pytest.raises(DlpipeError, match="unknown model 'nope'.*deep_convnet"):
        get_spec("nope")


def test_duplicate_registration_is_refused():
    spec = get_spec("lenet5")
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec(name="lenet5", task="classification", builder=spec.builder,
                                 default_dataset="mnist", contract=spec.contract))


@pytest.mark.parametrize("name", list_models("classification"))
@pytest.mark.parametrize("channels,size,classes", [(1, (28, 28), 10), (3, (32, 32), 6)])
def test_classifier_output_shape(name, channels, size, classes):
    if name == "torchvision" and channels == 1:  # published weights are RGB: grayscale images are converted
        with pytest.raises(InputError, match="3-channel"):
            get_spec(name).build(in_channels=channels, image_size=list(size), num_classes=classes)
        return
    model = get_spec(name).build(in_channels=channels, image_size=list(size), num_classes=classes).eval()
    out = model(torch.randn(3, channels, *size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


def test_builders_are_keyword_only():
    with pytest.raises(TypeError):
        get_spec("lenet5").builder(1, (28, 28), 10)


def test_deep_convnet_matches_the_textbook_layout():
    model = get_spec("deep_convnet").build(in_channels=1, image_size=[28, 28], num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert [c.padding[0] for c in convs] == [1, 1, 1, 2, 1, 1]  # the fourth conv pads 2
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64 * 4 * 4, 50), (50, 10)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_residual_block_adds_its_input():
    from dlpipe.training.models.classifiers import ResidualBlock

    block = ResidualBlock(8, 8, stride=1, batch_norm=False).eval()
    for p in (block.conv2.weight, block.conv2.bias):
        torch.nn.init.zeros_(p)  # F(x) = 0, so y = relu(0 + x)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), torch.relu(x))


def test_lenet5_refuses_tiny_images():
    with pytest.raises(ValueError, match="at least 28x28"):
        get_spec("lenet5").build(in_channels=1, image_size=[16, 16], num_classes=10)
