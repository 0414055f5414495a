"""All 40 `keras.applications` constructors, registered as backbone specs."""

from __future__ import annotations

import functools

import keras

from keras_transfer.backbones.registry import BackboneSpec, register_backbone

# (registry name, keras constructor, family, preprocessing mode, default size,
#  minimum size, block rule). Sizes and modes from the keras.applications
# sources (`obtain_input_shape(default_size=..., min_size=...)` and each
# module's `preprocess_input`); MobileNetV3 has no check and works at 32.
_APPLICATIONS = (
    ("convnext_tiny", "ConvNeXtTiny", "convnext", "none", 224, 32),
    ("convnext_small", "ConvNeXtSmall", "convnext", "none", 224, 32),
    ("convnext_base", "ConvNeXtBase", "convnext", "none", 224, 32),
    ("convnext_large", "ConvNeXtLarge", "convnext", "none", 224, 32),
    ("convnext_xlarge", "ConvNeXtXLarge", "convnext", "none", 224, 32),
    ("densenet121", "DenseNet121", "densenet", "torch", 224, 32),
    ("densenet169", "DenseNet169", "densenet", "torch", 224, 32),
    ("densenet201", "DenseNet201", "densenet", "torch", 224, 32),
    ("efficientnet_b0", "EfficientNetB0", "efficientnet", "none", 224, 32),
    ("efficientnet_b1", "EfficientNetB1", "efficientnet", "none", 240, 32),
    ("efficientnet_b2", "EfficientNetB2", "efficientnet", "none", 260, 32),
    ("efficientnet_b3", "EfficientNetB3", "efficientnet", "none", 300, 32),
    ("efficientnet_b4", "EfficientNetB4", "efficientnet", "none", 380, 32),
    ("efficientnet_b5", "EfficientNetB5", "efficientnet", "none", 456, 32),
    ("efficientnet_b6", "EfficientNetB6", "efficientnet", "none", 528, 32),
    ("efficientnet_b7", "EfficientNetB7", "efficientnet", "none", 600, 32),
    ("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", "none", 224, 32),
    ("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", "none", 240, 32),
    ("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", "none", 260, 32),
    ("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", "none", 300, 32),
    ("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", "none", 384, 32),
    ("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", "none", 480, 32),
    ("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", "none", 480, 32),
    ("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", "tf", 299, 75),
    ("inception_v3", "InceptionV3", "inception_v3", "tf", 299, 75),
    ("mobilenet", "MobileNet", "mobilenet", "tf", 224, 32),
    ("mobilenet_v2", "MobileNetV2", "mobilenet_v2", "tf", 224, 32),
    ("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", "none", 224, 32),
    ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", "none", 224, 32),
    ("nasnet_large", "NASNetLarge", "nasnet", "tf", 331, 32),
    ("nasnet_mobile", "NASNetMobile", "nasnet", "tf", 224, 32),
    ("resnet50", "ResNet50", "resnet", "caffe", 224, 32),
    ("resnet101", "ResNet101", "resnet", "caffe", 224, 32),
    ("resnet152", "ResNet152", "resnet", "caffe", 224, 32),
    ("resnet50_v2", "ResNet50V2", "resnet_v2", "tf", 224, 32),
    ("resnet101_v2", "ResNet101V2", "resnet_v2", "tf", 224, 32),
    ("resnet152_v2", "ResNet152V2", "resnet_v2", "tf", 224, 32),
    ("vgg16", "VGG16", "vgg", "caffe", 224, 32),
    ("vgg19", "VGG19", "vgg", "caffe", 224, 32),
    ("xception", "Xception", "xception", "tf", 299, 71),
)

# Families whose layer names follow another family's block layout.
_BLOCK_RULES = {"efficientnet_v2": "efficientnet", "resnet_v2": "resnet"}


def _build_application(class_name, input_shape, weights, name, **kwargs):
    constructor = getattr(keras.applications, class_name)
    model = constructor(
        include_top=False, weights=weights, input_shape=tuple(input_shape), **kwargs
    )
    # Renamed afterwards: EfficientNetV2 looks its block table up by `name`.
    model.name = name
    return model


def _register_all():
    for name, class_name, family, mode, default, minimum in _APPLICATIONS:
        register_backbone(
            BackboneSpec(
                name=name,
                family=family,
                constructor=functools.partial(_build_application, class_name),
                preprocessing=mode,
                default_input_size=default,
                min_input_size=minimum,
                block_rule=_BLOCK_RULES.get(family, family),
            )
        )


_register_all()
