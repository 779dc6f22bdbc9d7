"""The ``lightning-grokfast`` command: a :class:`~lightning.pytorch.cli.LightningCLI` with Grokfast built in.

``lightning-grokfast fit --config ema`` trains the built-in modular-arithmetic task
(:class:`~lightning_grokfast.tasks.GrokTransformer` on :class:`~lightning_grokfast.tasks.ModularArithmeticDataModule`)
with the Grokfast EMA filter and the grokking dashboard. ``--model`` and ``--data`` pick another built-in task
(``--model MLPClassifier --data SparseParityDataModule``, or a shipped config such as ``parity_ema``); the
sizes the data determines (``num_tokens``, ``num_inputs``, ``num_classes``) are passed on to the model.
Besides LightningCLI's own ``trainer``/``model``/``data``
groups, the parser has three callback groups:

* ``grokfast``: :class:`~lightning_grokfast.GrokfastCallback` (``--grokfast.filter ma --grokfast.lamb 5``), on by
  default; ``--grokfast.enabled false`` turns the filter off (the baseline).
* ``dashboard``: :class:`~lightning_grokfast.GrokkingDashboardCallback`, on by default
  (``--dashboard.enabled false`` leaves it out).
* ``detector``: :class:`~lightning_grokfast.GrokkingDetectorCallback`, off by default
  (``--detector.enabled true --detector.lambda_boost 1.5``).

The same callbacks can instead be listed under ``trainer.callbacks`` in ``class_path`` form, as in any
LightningCLI YAML; a callback given there replaces the group's default one (configuring both raises).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_grokfast.callbacks.dashboard import GrokkingDashboardCallback
from lightning_grokfast.callbacks.detector import GrokkingDetectorCallback
from lightning_grokfast.callbacks.grokfast import GrokfastCallback
from lightning_grokfast.cli.configs import list_configs, resolve_config_args
from lightning_grokfast.tasks.base import SplitDataModule, TaskModule
from lightning_grokfast.tasks.modular import GrokTransformer, ModularArithmeticDataModule

#: Trainer defaults of ``lightning-grokfast`` for the built-in task: validation every epoch (about 10 optimizer
#: steps at batch size 512), logging every 10 steps, and a step budget in which the Grokfast configs grok.
TASK_TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "max_steps": 3000,
    "log_every_n_steps": 10,
    "check_val_every_n_epoch": 1,
}

#: Model arguments that a built-in task's datamodule determines (read from the datamodule's properties of the
#: same names) when ``lightning-grokfast`` selects the task's classes with ``--model``/``--data``.
TASK_SIZES = ("num_tokens", "num_inputs", "num_classes")


class GrokfastCLI(LightningCLI):
    r"""LightningCLI with the ``grokfast``, ``dashboard`` and ``detector`` argument groups.

    ``lightning-grokfast`` is this class with the built-in modular-arithmetic task. Give it your own LightningModule
    and LightningDataModule to get the same groups, configs and dashboard for your model. When the model takes a
    ``num_tokens`` argument and the datamodule has a ``num_tokens`` attribute, ``data.num_tokens`` is linked to
    ``model.num_tokens``.

    Args:
        model_class: the LightningModule (default: :class:`~lightning_grokfast.tasks.GrokTransformer`).
        datamodule_class: the LightningDataModule (default:
            :class:`~lightning_grokfast.tasks.ModularArithmeticDataModule`).
        *args: further positional arguments of :class:`~lightning.pytorch.cli.LightningCLI`.
        seed_everything_default: seed used unless ``--seed_everything`` says otherwise (default 0: runs repeat).
        **kwargs: further keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI` (``args``, ``run``,
            ``trainer_defaults``, ...).

    Raises:
        MisconfigurationException: If a callback is configured both through its group and in ``trainer.callbacks``.

    Example::

        # my_cli.py; then: python my_cli.py fit --grokfast.lamb 5 --trainer.max_steps 1000
        from lightning_grokfast.cli.fit import GrokfastCLI

        if __name__ == "__main__":
            GrokfastCLI(MyModel, MyDataModule)

    """

    def __init__(
        self,
        model_class: type[LightningModule] | Callable[..., LightningModule] | None = GrokTransformer,
        datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule] | None = (
            ModularArithmeticDataModule
        ),
        *args: Any,
        seed_everything_default: bool | int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[misc]  # (mypy misreads *args followed by a keyword)
            model_class, datamodule_class, *args, seed_everything_default=seed_everything_default, **kwargs
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(GrokfastCallback, "grokfast")
        _add_switchable_callback_args(parser, GrokkingDashboardCallback, "dashboard", enabled=True)
        _add_switchable_callback_args(parser, GrokkingDetectorCallback, "detector", enabled=False)
        if self.subclass_mode_model and self.subclass_mode_data:
            return
        if _takes_num_tokens(self.model_class) and hasattr(self.datamodule_class, "num_tokens"):
            parser.link_arguments("data.num_tokens", "model.num_tokens", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """With ``--model``/``--data`` class paths, give the model the sizes its datamodule determines."""
        if self.subclass_mode_model and self.subclass_mode_data:
            config = self.config[self.subcommand] if self.subcommand else self.config
            _pass_task_sizes(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = {**self._lightning_cli_value(self.config_init, "trainer", default={}), **kwargs}
        listed = trainer_config.get("callbacks") or []
        listed = [listed] if isinstance(listed, Callback) else list(listed)
        extra: list[Callback] = []

        grokfast = self._lightning_cli_value(self.config_init, "grokfast")
        if not any(isinstance(c, GrokfastCallback) for c in listed):
            extra.append(grokfast)
        elif grokfast.enabled and self._group_changed("grokfast"):
            raise MisconfigurationException(
                "GrokfastCallback is configured twice: in `trainer.callbacks` and with the `grokfast` group"
                " (`--grokfast.*`). Keep one, or set `grokfast.enabled: false`."
            )

        switchable = [("dashboard", GrokkingDashboardCallback), ("detector", GrokkingDetectorCallback)]
        for key, callback_class in switchable:
            group = self._lightning_cli_value(self.config_init, key)
            if group is None or not group.get("enabled"):
                continue
            if any(isinstance(c, callback_class) for c in listed):
                if self._group_changed(key, ignore=("enabled",)):
                    raise MisconfigurationException(
                        f"{callback_class.__name__} is configured twice: in `trainer.callbacks` and with the `{key}`"
                        f" group (`--{key}.*`). Keep one."
                    )
                continue
            init_args = {k: v for k, v in group.items() if k != "enabled"}
            extra.append(callback_class(**init_args))
        return self._lightning_cli_trainer(trainer_config, extra)

    # The three private LightningCLI methods this CLI relies on, each called from here only
    # (tests/test_private_apis.py pins their signatures).
    def _lightning_cli_value(self, config: Any, key: str, default: Any = None) -> Any:
        """``config[subcommand][key]`` (LightningCLI's private ``_get``)."""
        return self._get(config, key, default=default)

    def _lightning_cli_defaults(self) -> Any:
        """The parser defaults of the current subcommand (LightningCLI's private ``_parser``)."""
        return self._parser(self.subcommand).get_defaults()

    def _lightning_cli_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """The Trainer with extra callbacks (LightningCLI's private ``_instantiate_trainer``)."""
        return self._instantiate_trainer(config, callbacks)

    def _group_changed(self, key: str, ignore: tuple[str, ...] = ()) -> bool:
        """Whether the parsed config of argument group ``key`` differs from the group's defaults."""
        defaults = self._lightning_cli_defaults().get(key)
        given = self._lightning_cli_value(self.config, key)
        if defaults is None or given is None:
            return False
        names = (set(vars(defaults)) | set(vars(given))) - set(ignore)
        return any(defaults.get(name) != given.get(name) for name in names)


class TaskCLI(GrokfastCLI):
    r""":class:`GrokfastCLI` over every built-in task: the ``lightning-grokfast`` command.

    ``--model`` takes any :class:`~lightning_grokfast.tasks.TaskModule` (a classifier or a regressor) and ``--data`` any
    :class:`~lightning_grokfast.tasks.SplitDataModule` (class name or class path); without them, the modular
    task (:class:`~lightning_grokfast.tasks.GrokTransformer` on
    :class:`~lightning_grokfast.tasks.ModularArithmeticDataModule`). Init arguments are given as usual
    (``--model.weight_decay 0.01``, ``--data.p 113``), and the sizes in :data:`TASK_SIZES` go from the data to the
    model.

    Args:
        *args: further positional arguments of :class:`GrokfastCLI`.
        **kwargs: further keyword arguments of :class:`GrokfastCLI` (``args``, ``run``, ``trainer_defaults``, ...).

    Example::

        TaskCLI(args=["fit", "--model", "MLPClassifier", "--data", "SparseParityDataModule"])

    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(TaskModule, SplitDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults(
            {
                "model": {"class_path": f"{GrokTransformer.__module__}.{GrokTransformer.__qualname__}"},
                "data": {
                    "class_path": f"{ModularArithmeticDataModule.__module__}.{ModularArithmeticDataModule.__qualname__}"
                },
            }
        )


def _add_switchable_callback_args(
    parser: LightningArgumentParser, callback_class: type[Callback], key: str, enabled: bool
) -> None:
    """Add the init arguments of ``callback_class`` under ``key``, plus a ``--{key}.enabled`` switch.

    Unlike ``add_lightning_class_args`` (whose callback is always instantiated), the group is not instantiated by
    the parser: :meth:`GrokfastCLI.instantiate_trainer` builds the callback only when the switch is on.
    """
    parser.add_class_arguments(callback_class, key, instantiate=False, fail_untyped=False, sub_configs=True)
    parser.add_argument(
        f"--{key}.enabled",
        type=bool,
        default=enabled,
        help=f"Whether to add {callback_class.__name__} to the trainer's callbacks.",
    )


def _pass_task_sizes(config: Namespace) -> None:
    """Set the model's :data:`TASK_SIZES` init arguments from the datamodule's properties of the same names.

    Only the names that the model's ``__init__`` takes and the datamodule class defines as properties are set; the
    datamodule is built once here from its init arguments (the built-in ones are small and deterministic).
    """
    model, data = config.get("model"), config.get("data")
    if not isinstance(model, Namespace) or not isinstance(data, Namespace) or not data.get("class_path"):
        return
    data_class = import_object(data.class_path)
    parameters = inspect.signature(import_object(model.class_path)).parameters
    names = [n for n in TASK_SIZES if n in parameters and isinstance(getattr(data_class, n, None), property)]
    if not names:
        return
    init_args = data.get("init_args")
    datamodule = data_class(**(init_args.as_dict() if init_args is not None else {}))
    if model.get("init_args") is None:
        model.init_args = Namespace()
    for name in names:
        model.init_args[name] = getattr(datamodule, name)


def _takes_num_tokens(model_class: Any) -> bool:
    try:
        return "num_tokens" in inspect.signature(model_class).parameters
    except (TypeError, ValueError):
        return False


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-grokfast`` console script (:class:`TaskCLI`: the built-in tasks).

    ``--config NAME`` (or ``NAME.yaml``, ``configs/NAME.yaml``) runs the config of that name shipped in the package
    when no such file exists (see :mod:`lightning_grokfast.cli.configs`); ``configs`` lists the shipped configs and
    ``configs NAME`` prints one.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "ema"]``.

    Raises:
        SystemExit: For ``configs NAME`` with a name that is not shipped (the shipped names listed), and as
            LightningCLI exits on bad arguments and after ``--help``.

    Example::

        $ lightning-grokfast configs                     # the shipped configs, one line each
        $ lightning-grokfast fit --config ema            # the shipped ema.yaml (in a clone: configs/ema.yaml)
        $ lightning-grokfast fit --grokfast.filter ma --grokfast.lamb 5 --model.weight_decay 0.01
        $ lightning-grokfast fit --config parity_ema --print_config > my_run.yaml
        $ lightning-grokfast fit --model MLPClassifier --data DigitsDataModule --model.init_scale 16

    """
    if args is None or isinstance(args, (list, tuple)):
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        if argv[:1] == ["configs"]:
            try:
                print(list_configs(argv[1] if len(argv) > 1 else None), end="")
            except ValueError as error:
                raise SystemExit(f"lightning-grokfast configs: {error}") from None
            return
        resolved = resolve_config_args(argv)
        if args is not None:
            args = resolved
        elif resolved != argv:
            sys.argv[1:] = resolved  # LightningCLI reads sys.argv itself when given no args
    TaskCLI(
        trainer_defaults=TASK_TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "Train the built-in grokking task with Grokfast (arXiv 2405.20233). `--config NAME` runs"
            " a config shipped in the package (`lightning-grokfast configs` lists them). `lightning-grokfast tune"
            " --config CONFIG.yaml` searches the Grokfast settings that reach a target in the fewest steps, on"
            " Optuna (`lightning-grokfast tune --help`; needs the [tune] extra)."
        },
        args=args,
    )


if __name__ == "__main__":
    main()
