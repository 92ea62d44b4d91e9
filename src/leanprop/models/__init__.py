"""Model zoo: CIFAR and ImageNet CNNs, built by name.

>>> from leanprop import models
>>> net = models.create("resnet20")            # 10 classes by default (cifar family)
>>> models.model_info("resnet50").input_size
224

Importing this package imports every model module, which registers its models.  Each model is
plain ``torch.nn`` (real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.ReLU`` submodules registered in
call order), so layers can be found and swapped by walking ``named_modules()``.
"""

from . import (  # noqa: F401  (imported for their registrations)
    cifar_resnet,
    cifar_resnet_large,
    convnext,
    densenet,
    efficientnet,
    imagenet_resnet,
    mobilenet_v2,
    preact_resnet,
    vgg,
    wide_resnet,
)
from .registry import ModelInfo, create, list_models, model_info, register

__all__ = ["ModelInfo", "create", "list_models", "model_info", "register"]
