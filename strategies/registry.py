"""One registry of strategy plugins by name, for every model family.

A config names its strategy as ``strategy.plugins``: a list of ``{name: ..., <options>}`` entries.
Names resolve here (the project's plugins and Avalanche's LwF / EWC), through the
``incremental.plugins`` entry-point group (a user's package registers ``name = module:Class``), or as a
``module:Class`` string. Options are checked against the plugin's own constructor signature and
coerced to its type hints, so an unknown or mistyped option is one line naming it (exit code 2).

A model family may add what only it knows (the frozen deployed model, its old-model adapter, its
task list) through :class:`FamilyHook` s: a hook may declare options of its own (for example the
detector adapter's ``pseudo_score``), consumes them, and returns extra constructor arguments.
"""
from __future__ import annotations

import importlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from incremental.config import ConfigError, coerce

#: Built-in plugins: name -> "module:Class" (imported only when used).
PLUGINS: dict[str, str] = {
    "replay": "strategies.replay:ReplayPlugin",
    "gradient_mixing": "strategies.gradient_mixing:GradientMixingPlugin",
    "pseudo_label_distillation": "strategies.pseudo_label_distillation:PseudoLabelDistillationPlugin",
    "dynamic_loss_weighting": "strategies.dynamic_loss_weighting:DynamicLossWeightingPlugin",
    "lwf": "avalanche.training.plugins:LwFPlugin",
    "ewc": "avalanche.training.plugins:EWCPlugin",
}
ENTRY_POINT_GROUP = "incremental.plugins"
#: Options that belong to the loop's history library (``strategy.history``), never to a plugin entry.
LOOP_OPTIONS = ("mem_size", "storage_policy", "policy", "history_batch_size")


@dataclass
class FamilyHook:
    """What a model family adds to one plugin: ``options`` it accepts beyond the plugin's signature
    (name -> type) and ``build(options) -> extra constructor kwargs`` (it receives those options, with
    their defaults filled from ``defaults``)."""

    build: Callable[[dict[str, Any]], dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


def register_plugin(name: str, target: str | type) -> None:
    """Make ``name`` usable in ``strategy.plugins`` (``"module:Class"`` or the class itself)."""
    PLUGINS[name] = target  # type: ignore[assignment]


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    return sorted(set(PLUGINS) | set(_entry_points()))


def resolve(name: str, key: str = "strategy.plugins") -> type:
    """The plugin class for a registry name, an entry point or a ``module:Class`` string."""
    target: Any = PLUGINS.get(name)
    if target is None:
        ep = _entry_points().get(name)
        if ep is not None:
            return ep.load()
        if ":" not in name:
            raise ConfigError(f"{key}.name", f"unknown plugin {name!r}; known: {', '.join(known_names())}, "
                                             "or module:Class")
        target = name
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}.name", f"cannot import {module_name!r} for plugin {name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"{key}.name", f"{module_name!r} has no {attr!r} (plugin {name!r})")
    return cls


def signature_options(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword-settable constructor parameters of ``cls`` (``self`` and ``*args`` / ``**kwargs`` left out)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items()
            if n != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations (Avalanche's): values pass as given
        return {}


def build_plugin(entry: Mapping[str, Any], index: int = 0, hooks: Mapping[str, FamilyHook] | None = None,
                 defaults: Mapping[str, Any] | None = None) -> Any:
    """One plugin from a ``{name, **options}`` entry; errors name ``strategy.plugins[index].<option>``.

    ``defaults`` are constructor arguments the run provides when the entry does not (the run's seed);
    they are passed only to plugins whose signature has them.
    """
    key = f"strategy.plugins[{index}]"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ConfigError(key, f"must be a mapping with a name, e.g. {{name: replay}}, got {entry!r}")
    name = entry["name"]
    options = {k: v for k, v in entry.items() if k != "name"}
    cls = resolve(name, key)
    accepted = signature_options(cls)
    hook = (hooks or {}).get(name)
    for option in options:
        if option in LOOP_OPTIONS:
            raise ConfigError(f"{key}.{option}", "the loop's history library is configured in strategy.history "
                                                 "(mem_size, policy, batch_size)")
        if option not in accepted and (hook is None or option not in hook.options):
            known = sorted(set(accepted) | set(hook.options if hook else ()))
            raise ConfigError(f"{key}.{option}", f"unknown option of plugin {name!r} (known: {', '.join(known)})")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for option, value in options.items():
        if option in accepted:
            tp = hints.get(option, Any)
            kwargs[option] = coerce(value, tp, f"{key}.{option}") if tp is not Any else value
    if hook is not None:
        own = {**hook.defaults, **{k: coerce(v, hook.options[k], f"{key}.{k}")
                                   for k, v in options.items() if k in hook.options}}
        try:
            extras = hook.build(own)
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc.key}" if exc.key else key, str(exc).split(": ", 1)[-1]) from None
        for extra, value in extras.items():
            kwargs.setdefault(extra, value)
    for extra, value in (defaults or {}).items():
        if extra in accepted:
            kwargs.setdefault(extra, value)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the plugin's own checks name its option: put it under the entry
        raise ConfigError(f"{key}.{exc.key}" if exc.key else key, str(exc).split(": ", 1)[-1]) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"plugin {name!r}: {str(exc).splitlines()[0]}") from None


def build_plugins(entries: Sequence[Mapping[str, Any]], hooks: Mapping[str, FamilyHook] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> list[Any]:
    """The plugins of ``strategy.plugins`` in order (a name may appear once)."""
    names = [e.get("name") for e in entries if isinstance(e, Mapping)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError("strategy.plugins", f"plugin {twice[0]!r} is listed twice")
    return [build_plugin(entry, i, hooks, defaults) for i, entry in enumerate(entries)]
