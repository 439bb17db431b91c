"""LightningCLI's layout of a config, rewritten into the schema's own, so a LightningCLI config carries over.

LightningCLI writes the Trainer's arguments flat (`trainer: {max_epochs: 2, callbacks: [...]}`) and the data module
as a component (`data: {class_path: ..., init_args: ...}`). The schema keeps the Trainer as `class_path` +
`init_args` (a Trainer subclass may be named) and the user's callbacks in `callbacks`; `trainer.callbacks` are
those same callbacks (the cycle puts its defenses before them). The cycle trains through trainguard's own data
module only, on signed and screened shards: `data:` may name it, with the decoders and transforms as its
`init_args`; another data module would read data the cycle never verified, and is refused.
"""

from __future__ import annotations

from typing import Any

DATA_MODULE = "trainguard.provenance.VerifiedDataModule"
"""The data module a cycle trains through, as a LightningCLI `data.class_path` names it."""
_DATA_MODULE_PATHS = (DATA_MODULE, "trainguard.provenance.dataset.VerifiedDataModule")
_DATA_MODULE_KNOBS = {
    "batch_size": "training.batch_size",
    "num_workers": "training.num_workers",
    "seed": "training.seed",
    "manifests": "dataset.training",
    "trust": "dataset.trust",
    "feature_columns": "validation.feature_columns",
    "label_column": "validation.label_column",
}
"""VerifiedDataModule's arguments that the config sets in another section, and where."""
_DATA_MODULE_SUPPLIED = (
    "state_file",
    "train_roles",
    "val_roles",
    "sources",
    "exclude",
    "exclude_rows",
    "refuse_changed",
)
"""VerifiedDataModule's arguments the cycle sets from what it verified and screened."""
_COMPONENT_KEYS = ("class_path", "init_args")


def lightning_layout(data: Any) -> Any:
    """`data` with a LightningCLI-layout `trainer:` and `data:` rewritten into the schema's layout (anything else,
    and a config already in the schema's layout, unchanged); the caller's data is never modified.

    Args:
        data: A config as parsed from YAML.

    Returns:
        The config in the schema's layout: Trainer arguments under `trainer.init_args`, the user's callbacks in
        `callbacks`, the data module's `init_args` as the `data` section.

    Raises:
        ValueError: The two layouts mixed in one block, callbacks written in both places, or a data module other
            than the cycle's; the message starts with the dotted key at fault.
    """
    if not isinstance(data, dict):
        return data
    shaped = dict(data)
    trainer = shaped.get("trainer")
    if isinstance(trainer, dict):
        shaped["trainer"] = _trainer_layout(trainer)
        init_args = shaped["trainer"].get("init_args")
        if isinstance(init_args, dict) and "callbacks" in init_args:
            shaped["trainer"] = {**shaped["trainer"], "init_args": dict(init_args)}
            moved = shaped["trainer"]["init_args"].pop("callbacks")
            if moved and shaped.get("callbacks"):
                raise ValueError(
                    "trainer.callbacks: your callbacks go in one place, trainer.callbacks (LightningCLI's) or "
                    "callbacks, not both"
                )
            shaped["callbacks"] = moved or shaped.get("callbacks", [])
    section = shaped.get("data")
    if isinstance(section, dict) and "class_path" in section:
        shaped["data"] = _data_module_layout(section)
    return shaped


def _trainer_layout(trainer: dict[str, Any]) -> dict[str, Any]:
    """LightningCLI's flat Trainer arguments as `init_args`; a block in the schema's layout as it is."""
    flat = [key for key in trainer if key not in _COMPONENT_KEYS]
    if not flat:
        return trainer
    written = [key for key in _COMPONENT_KEYS if key in trainer]
    if written:
        raise ValueError(
            f"trainer.{flat[0]}: the trainer block is either Trainer arguments (LightningCLI's layout) or "
            f"class_path + init_args, not both: move it under trainer.init_args, or drop trainer.{written[0]}"
        )
    return {"init_args": dict(trainer)}


def _data_module_layout(section: dict[str, Any]) -> Any:
    """A `data: {class_path, init_args}` block naming the cycle's data module, as the `data` section it stands for."""
    extra = [key for key in section if key not in _COMPONENT_KEYS]
    if extra:
        raise ValueError(f"data.{extra[0]}: a data module is written as class_path + init_args only")
    if section["class_path"] not in _DATA_MODULE_PATHS:
        raise ValueError(
            f"data.class_path: {section['class_path']} is not {DATA_MODULE}, the one data module a cycle trains "
            "through (it reads the signed, screened shards of `dataset:` and nothing else); name it, with "
            "decoders, transform and val_transform as its init_args"
        )
    init_args = section.get("init_args", {})
    if isinstance(init_args, dict):
        for key, where in _DATA_MODULE_KNOBS.items():
            if key in init_args:
                raise ValueError(f"data.init_args.{key}: the cycle's data module takes it from {where}; set it there")
        supplied = [key for key in _DATA_MODULE_SUPPLIED if key in init_args]
        if supplied:
            raise ValueError(
                f"data.init_args.{supplied[0]}: set by the cycle from what it verified and screened (remove it)"
            )
    return init_args
