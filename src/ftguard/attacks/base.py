"""What an attack provides: a config dataclass and the rule that builds the user's upload.

An attack is the uploader's side of the threat model (docs/attacks.md): from the pools the provider's data plan
holds for the run (the task's training rows, the general instructions, the harmful answers kept for the attack)
it builds, deterministically from the run's seed, the rows the fine-tuning stage trains on. The default,
``harmful_mix``, is the papers' p-harmful mix. Attacks register by name like methods; the data plan builds the
upload of every ratio before any training, so a wrong argument or a pool too small fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ftguard.data.example import Example
from ftguard.data.mix import harmful_count
from ftguard.registry import Registry
from ftguard.schema import from_dict

if TYPE_CHECKING:
    from ftguard.config import RunConfig


@dataclass
class NoAttackArgs:
    """For attacks without arguments of their own."""


@dataclass(frozen=True)
class UploadPools:
    """What the provider's data plan holds for the upload of one run, in file order (the papers take first rows).

    ``benign`` is the general instructions followed by the task's rows (general first, so that every ratio keeps
    them); ``harmful`` the (prompt → harmful answer) pairs reserved for the attack.
    """

    benign: list[Example]
    harmful: list[Example]
    n: int
    n_general: int = 0


@dataclass
class Upload:
    """The rows the fine-tuning stage trains on, and what went into them (recorded in results.json)."""

    examples: list[Example]
    report: dict[str, Any] = field(default_factory=dict)


class Attack:
    """Base of every attack. A subclass sets the class attributes and ``build``.

    ``harmful_needed`` and ``benign_needed`` say how many rows of each pool the upload at ratio p takes, so the
    data plan can reserve them (the harmful pool shares its file with the alignment data) before building it.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str] = ""
    config_class: ClassVar[type] = NoAttackArgs
    # An attack that reads the model it attacks (the aligned model, white-box: open weights) builds its candidate
    # rows in ``build`` and chooses or rewrites them in ``adapt`` when the fine-tuning stage starts; its arguments
    # then enter the fine-tune's fingerprint (the candidates' digest alone does not say what ``adapt`` did).
    needs_model: ClassVar[bool] = False
    # An attack whose fine-tune teaches a trigger (a jailbreak template, a persona prompt) is evaluated, as its
    # paper does, on prompts passed through ``trigger``.
    has_trigger: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def from_args(cls, args: dict[str, Any] | None, prefix: str = "data.finetune.attack.args") -> Attack:
        return cls(from_dict(cls.config_class, args or {}, prefix=prefix))

    def harmful_needed(self, n: int, p: float) -> int:
        return harmful_count(n, p)

    def benign_needed(self, n: int, p: float) -> int:
        return n - harmful_count(n, p)

    def build(self, pools: UploadPools, p: float, seed: int) -> Upload:
        raise NotImplementedError

    def adapt(self, upload: Upload, model_dir: str, run: RunConfig, seed: int) -> Upload:
        """The upload as the attacker sends it, made from ``build``'s candidates with the model of ``model_dir``
        (the aligned model the fine-tune starts from). Only attacks with ``needs_model`` define it."""
        raise NotImplementedError(f"attack '{self.name}' does not read the model")

    def trigger(self, example: Example) -> Example:
        """The evaluation prompt as the attacker sends it to the fine-tuned model (unchanged by default)."""
        return example

    def describe(self) -> dict[str, Any]:
        """The attack's name and arguments, as results.json records them."""
        from ftguard.schema import to_dict

        return {"name": self.name, "args": to_dict(self.config)}


def _load_builtin_attacks() -> None:
    from ftguard.attacks import load_builtin_attacks

    load_builtin_attacks()


_ATTACKS: Registry[type[Attack]] = Registry("attack", _load_builtin_attacks)


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add ``cls`` under ``cls.name`` (lower-case, unique)."""
    return _ATTACKS.register(cls.name, cls)


def all_attacks() -> dict[str, type[Attack]]:
    return _ATTACKS.loaded()


def get_attack(name: str) -> type[Attack]:
    return _ATTACKS.require(name)


def attack_from_spec(spec: Any) -> Attack:
    """The attack of ``data.finetune.attack`` (name and args), its args parsed and checked."""
    return get_attack(spec.name).from_args(spec.args)
