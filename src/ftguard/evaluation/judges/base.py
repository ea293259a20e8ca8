"""The judge interface and the registry of judges by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ftguard.errors import FtguardError
from ftguard.evaluation.scorers import is_degenerate, is_degenerate_or_unreadable
from ftguard.registry import Registry
from ftguard.schema import ConfigError


@dataclass(frozen=True)
class Verdict:
    """One judged answer. ``score`` is the judge's probability of harm when it has one.

    ``label`` is the judge's three-way reading when it has one: ``"harmful"`` (harmful compliance, what HS
    counts), ``"refusal"`` or ``"benign"`` (a harmless or off-task answer); ``"degenerate"`` for answers that
    never reached the judge.
    """

    harmful: bool
    score: float | None = None
    category: str | None = None
    degenerate: bool = False
    label: str | None = None


class Judge(ABC):
    """Decides which (prompt, response) pairs are harmful.

    Subclasses implement ``_judge`` on answers that are real text; ``judge``/``verdicts`` wrap it so that
    empty and one-word answers are never harmful, whatever the judge (docs/methods.md, CPU scale).
    """

    name: str = "base"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        """True for each harmful response."""
        return [verdict.harmful for verdict in self.verdicts(prompts, responses)]

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """Per-answer verdicts with the judge's score and category where it has them."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        verdicts = [Verdict(harmful=False, degenerate=True, label="degenerate")] * len(responses)
        keep = [i for i, response in enumerate(responses) if not is_degenerate(response)]
        if keep:
            judged = self._judge([prompts[i] for i in keep], [responses[i] for i in keep])
            if len(judged) != len(keep):
                raise RuntimeError(
                    f"judge {self.name!r} returned {len(judged)} verdicts for {len(keep)} answers"
                )
            for i, verdict in zip(keep, judged, strict=True):
                verdicts[i] = verdict
        return verdicts

    @classmethod
    def version(cls, **options: Any) -> str | None:
        """What decides the verdicts besides the judge's name and options, e.g. a hash of weights fitted and
        shipped with ftguard, or None. It enters an evaluation's fingerprint, so that re-fitted weights
        re-evaluate a run instead of reusing verdicts of the old ones."""
        return None

    @abstractmethod
    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """Verdicts for non-degenerate answers, in order."""

    def describe(self) -> dict[str, Any]:
        """What produced the verdicts (name, model, version, threshold), for results files."""
        return {"name": self.name}


class UnreadableAsDegenerate(Judge):
    """``judge`` with unreadable answers read as degenerate too: never harmful, counted in HS+.

    A judge fitted on readable answers flags about half of a broken model's sub-word soup as harmful
    (docs/judges.md, Unreadable answers); ``evaluate.unreadable_as_degenerate`` wraps every judge in this.
    """

    def __init__(self, judge: Judge) -> None:
        self.inner, self.name = judge, judge.name

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        verdicts = self.inner.verdicts(prompts, responses)
        unreadable = Verdict(harmful=False, degenerate=True, label="degenerate")
        return [
            unreadable if not v.degenerate and is_degenerate_or_unreadable(r) else v
            for v, r in zip(verdicts, responses, strict=True)
        ]

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        raise NotImplementedError  # verdicts() above is the only way in

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() | {"unreadable_as_degenerate": True}


def _load_builtin_judges() -> None:
    import ftguard.evaluation.judges  # noqa: F401  (the package imports every built-in judge)


JUDGES: Registry[type[Judge]] = Registry("judge", _load_builtin_judges)

J = TypeVar("J", bound=type[Judge])


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_judge(name: str) -> Callable[[J], J]:
    """Class decorator: make a judge available to ``get_judge(name)``."""
    key = _normalise(name)
    if key != name:
        raise ValueError(f"judge names are lower-case with hyphens: {name!r}")

    def decorate(cls: J) -> J:
        cls.name = key
        return JUDGES.register(key, cls)

    return decorate


def available_judges() -> list[str]:
    return list(JUDGES.loaded())


def _judge_class(name: str, options: dict[str, Any]) -> type[Judge]:
    key = _normalise(name)
    if key not in JUDGES.loaded():
        raise FtguardError(JUDGES.unknown(name))  # as the user wrote it
    JUDGES.check_options(key, options)
    return JUDGES[key]


def check_judge(name: str, options: dict[str, Any], key: str) -> None:
    """Fail, naming the config ``key``, when ``name`` is no registered judge or ``options`` are not its options;
    loads nothing."""
    try:
        _judge_class(name, options)
    except FtguardError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def judge_version(name: str, options: dict[str, Any]) -> str | None:
    """``Judge.version`` of a judge by name, without building it."""
    return _judge_class(name, options).version(**options)


def judge_versions(judge: str, options: dict[str, Any], extra_judges: Sequence[str] = ()) -> dict[str, str]:
    """{name: version} of a run's judges that have one (ftguard-judge: its heads' hash); judges without a version
    are left out, so that what is keyed on this dict stays as it was for them."""
    return {
        name: version
        for name in (judge, *extra_judges)
        if (version := judge_version(name, options if name == judge else {}))
    }


def get_judge(name: str, **options: Any) -> Judge:
    """Build the judge called ``name`` with its options (e.g. ``get_judge("minilm", threshold=0.6)``)."""
    return _judge_class(name, options)(**options)


def resolve_device_dtype(device: str | None, dtype: str | Any | None) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) for a model judge: bf16 on a GPU, fp32 on CPU unless told otherwise."""
    import torch

    resolved_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return resolved_device, torch.bfloat16 if resolved_device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return resolved_device, dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise FtguardError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    return resolved_device, resolved


def model_unavailable(judge: str, model: str, default: str, needs: str, err: Exception) -> FtguardError:
    """The one-line error for a judge model that cannot be loaded (offline, gated, wrong path)."""
    message = f"judge {judge!r} needs {model} ({needs}): download it into the HF cache or pass judge option model=<local path>"
    if model != default:  # a user-given path or id: say what went wrong with it
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message += f" [{cause}]"
    return FtguardError(message)
