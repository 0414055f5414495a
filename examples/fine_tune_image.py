"""Fine-tune an ImageNet backbone on a folder of images (one subfolder per class).

Needs internet the first time (ImageNet weights download), e.g.:

    python examples/fine_tune_image.py /path/to/flower_photos
"""

import sys

import keras

import keras_transfer as kt


def main(data_dir: str) -> None:
    train, validation = keras.utils.image_dataset_from_directory(
        data_dir, image_size=(224, 224), batch_size=32, validation_split=0.2, subset="both", seed=0
    )
    model = kt.build_image_classifier(
        "efficientnet_v2_b0", num_classes=len(train.class_names), augmentation="standard"
    )
    history = kt.fine_tune(model, train, validation, recipe="two_stage", epochs=(3, 5))
    kt.trainable_summary(model)
    print({key: values[-1] for key, values in history.history.items()})
    model.save("fine_tuned.keras")


if __name__ == "__main__":
    main(sys.argv[1])
