"""The configs shipped in the package: find one by name, list them, print one.

``lightning-grokfast fit --config ema`` runs the shipped ``ema.yaml`` when the current directory has no file of
that name; ``lightning-grokfast configs`` lists the shipped configs and ``lightning-grokfast configs ema`` prints
one (to copy and edit: ``lightning-grokfast configs ema > my_run.yaml``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CONFIG_DIR",
    "config_description",
    "list_configs",
    "resolve_config_args",
    "shipped_config",
    "shipped_configs",
]

#: The folder of the YAML configs inside the installed package.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

_SUFFIXES = (".yaml", ".yml")
_CONFIG_FLAGS = ("--config", "-c")
_WIDTH = 100


def shipped_configs() -> dict[str, Path]:
    """The configs shipped in the package, by name (the file name without ``.yaml``), sorted by name.

    Returns:
        ``{name: path}`` for every ``*.yaml`` file in :data:`CONFIG_DIR`.

    Example::

        >>> from lightning_grokfast.cli.configs import shipped_configs
        >>> "ema" in shipped_configs()
        True

    """
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def shipped_config(value: str) -> Path | None:
    """The shipped config that ``value`` names, when ``value`` is not an existing file.

    ``value`` names a shipped config when it is its name (``ema``), its file name (``ema.yaml``) or the file name
    under ``configs/`` (``configs/ema.yaml``, the path in a clone of the repository). An existing file always
    wins: a ``ema.yaml`` in the current directory is used as it is.

    Args:
        value: the argument given to ``--config``.

    Returns:
        The path of the shipped config, or ``None`` when ``value`` is an existing file or names no shipped config.

    Example::

        >>> from lightning_grokfast.cli.configs import shipped_config
        >>> shipped_config("ma").name
        'ma.yaml'
        >>> shipped_config("no_such_config") is None
        True

    """
    path = Path(value)
    if path.exists() or path.parent not in (Path("."), Path("configs")):
        return None
    name = path.name[: -len(path.suffix)] if path.suffix in _SUFFIXES else path.name
    return shipped_configs().get(name)


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Replace every ``--config NAME`` (or ``--config=NAME``, ``-c NAME``) that names a shipped config by its path.

    Args:
        args: a command line without the program name.

    Returns:
        The command line with shipped configs' names replaced by their paths; everything else unchanged.

    Example::

        >>> from lightning_grokfast.cli.configs import resolve_config_args
        >>> resolve_config_args(["fit", "--config", "ema"])[2].endswith("configs/ema.yaml")
        True

    """
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and i + 1 < len(resolved):
            found = shipped_config(resolved[i + 1])
            if found is not None:
                resolved[i + 1] = str(found)
        elif arg.startswith("--config="):
            found = shipped_config(arg.split("=", 1)[1])
            if found is not None:
                resolved[i] = f"--config={found}"
    return resolved


def config_description(path: Path) -> str:
    """The first sentence of a config's leading comment (what the config runs), at most 100 characters.

    Args:
        path: a YAML config whose first lines are ``#`` comments.

    Returns:
        The first sentence of the leading comment block (shortened to 100 characters with `` ...``), or ``""``
        when the file starts without one.

    Example::

        >>> from lightning_grokfast.cli.configs import config_description, shipped_configs
        >>> config_description(shipped_configs()["ema"])
        "Grokfast EMA filter with the paper's settings: alpha 0.98, lamb 2.0, weight decay 0.005."

    """
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("lightning-grokfast ", "python ")):
            break
        words.append(text)
    text = " ".join(words)
    ends = [m.end() for m in re.finditer(r"(?<! al)\.(\s|$)", text)]
    sentence = text[: ends[0]].strip() if ends else text
    if len(sentence) > _WIDTH:
        sentence = sentence[: sentence.rfind(" ", 0, _WIDTH - 3)] + " ..."
    return sentence


def list_configs(name: str | None = None) -> str:
    """The text of ``lightning-grokfast configs [NAME]``: the table of shipped configs, or one config's YAML.

    Args:
        name: a shipped config's name (``ema`` or ``ema.yaml``); ``None`` lists them all.

    Returns:
        The listing (one config per line: name and what it runs) or the YAML text of the config ``name``.

    Raises:
        ValueError: If ``name`` is not a shipped config; the message lists the shipped names.

    Example::

        >>> from lightning_grokfast.cli.configs import list_configs
        >>> "ema" in list_configs()
        True
        >>> list_configs("ema").startswith("# Grokfast EMA")
        True

    """
    configs = shipped_configs()
    if name is not None:
        key = name[: -len(Path(name).suffix)] if Path(name).suffix in _SUFFIXES else name
        if key not in configs:
            raise ValueError(f"No shipped config named {name!r}; the shipped configs are: {', '.join(configs)}.")
        return configs[key].read_text()
    width = max(map(len, configs))
    lines = [f"{n:<{width}}  {config_description(p)}" for n, p in configs.items()]
    lines += ["", "Run one: lightning-grokfast fit --config NAME. Print one: lightning-grokfast configs NAME."]
    lines += [f"Shipped in {CONFIG_DIR}."]
    return "\n".join(lines) + "\n"
