"""Scorers: one registry, every example scored in [0, 1].

A scorer is named in a task file (``scorer: {name: ..., settings: {...}}``) and validated
when the task loads. It scores a batch of examples with an engine and returns one
:class:`ExampleScore` per example, so the per-example vectors survive for pruning and for
the proxy-vs-held-out analysis.

=================  =====================  =====================================================
name               engine call            score of one example
=================  =====================  =====================================================
exact_match        generate               1 if the response equals the reference
regex_match        generate               1 if the extracted match equals the reference
multiple_choice    loglikelihood          1 if the gold choice has the highest (normalised)
                                          log-likelihood
code_pass          generate + sandbox     1 if the generated code passes the example's tests
ifeval             generate               instructions followed (strict or loose), per prompt
                                          (all or nothing) or per instruction (fraction)
agreement          token_scores           next-token argmax agreement with a reference model,
                                          or exp(-KL(reference || candidate))
perplexity         token_scores           exp(-mean negative log-likelihood) = 1 / perplexity
=================  =====================  =====================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergesearch.errors import ConfigError, format_validation, unknown

__all__ = ["SCORERS", "ExampleScore", "Scorer", "GenerationScorer", "make_scorer", "extract_code"]


@dataclass(frozen=True)
class ExampleScore:
    """The score of one example in [0, 1], why, and the model's response if it generated one."""

    score: float
    detail: str = ""
    response: Optional[str] = None


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Scorer:
    """Base class: validated settings, the example fields it reads, and ``score``."""

    name: ClassVar[str]
    needs: ClassVar[str]
    Settings: ClassVar[type[_Settings]] = _Settings

    def __init__(self, settings: _Settings, spec: Any, base_dir: Path) -> None:
        self.settings = settings
        self.spec = spec
        self.base_dir = base_dir

    def required_fields(self) -> tuple[str, ...]:
        return ()

    def check_example(self, data: Mapping[str, Any], where: str) -> None:
        """Raise ConfigError if one example cannot be scored (called at load time)."""

    def score(self, engine: Any, examples: Sequence[Any]) -> list[ExampleScore]:
        raise NotImplementedError


class GenerationScorer(Scorer):
    """Generates a greedy response per example (task's generation settings), then scores it."""

    needs = "generate"

    def score(self, engine: Any, examples: Sequence[Any]) -> list[ExampleScore]:
        gen = self.spec.generation
        responses = engine.generate(
            [ex.prompt for ex in examples], max_new_tokens=gen.max_new_tokens, stop=gen.stop
        )
        return self.score_responses(examples, responses)

    def score_responses(self, examples: Sequence[Any], responses: Sequence[str]) -> list[ExampleScore]:
        return [self.score_response(ex, r) for ex, r in zip(examples, responses)]

    def score_response(self, example: Any, response: str) -> ExampleScore:
        raise NotImplementedError


def _reference_template(scorer: Scorer, reference: Optional[str]) -> Any:
    from mergesearch.eval.tasks import Template

    text = reference if reference is not None else scorer.spec.target
    if text is None:
        raise ConfigError(
            f"Scorer {scorer.name!r} of task {scorer.spec.name!r} needs a reference answer: add a "
            "`target` template to the task or `reference` to the scorer settings."
        )
    return Template.parse(text, f"task {scorer.spec.name!r} reference")


def _normalise(text: str, strip: bool, ignore_case: bool) -> str:
    if strip:
        text = text.strip()
    if ignore_case:
        text = text.casefold()
    return text


class ExactMatch(GenerationScorer):
    name = "exact_match"

    class Settings(_Settings):
        reference: Optional[str] = None
        strip: bool = True
        ignore_case: bool = False

    def __init__(self, settings: Any, spec: Any, base_dir: Path) -> None:
        super().__init__(settings, spec, base_dir)
        self.reference = _reference_template(self, settings.reference)

    def required_fields(self) -> tuple[str, ...]:
        return self.reference.fields

    def score_response(self, example: Any, response: str) -> ExampleScore:
        s = self.settings
        want = _normalise(self.reference.render(example.data, example.where), s.strip, s.ignore_case)
        got = _normalise(response, s.strip, s.ignore_case)
        ok = got == want
        return ExampleScore(float(ok), "" if ok else f"expected {want!r}", response)


class RegexMatch(GenerationScorer):
    """Extract with a regex (first or last match, as GSM8K-style tasks take the last number)."""

    name = "regex_match"

    class Settings(_Settings):
        pattern: str = r"-?\d+(?:\.\d+)?"
        group: Union[int, str] = 0
        select: Literal["first", "last"] = "last"
        reference: Optional[str] = None
        ignore_case: bool = False
        numeric: bool = False

    def __init__(self, settings: Any, spec: Any, base_dir: Path) -> None:
        super().__init__(settings, spec, base_dir)
        try:
            self.regex = re.compile(settings.pattern, re.IGNORECASE if settings.ignore_case else 0)
        except re.error as err:
            raise ConfigError(
                f"Task {spec.name!r}: scorer regex {settings.pattern!r} does not compile ({err}); fix "
                "the `pattern` setting (in YAML, single-quote it so backslashes survive)."
            ) from None
        g = settings.group
        if isinstance(g, int) and not 0 <= g <= self.regex.groups:
            raise ConfigError(
                f"Task {spec.name!r}: scorer group {g} does not exist; pattern "
                f"{settings.pattern!r} has {self.regex.groups} group(s)."
            )
        if isinstance(g, str) and g not in self.regex.groupindex:
            raise ConfigError(
                f"Task {spec.name!r}: scorer group {g!r} is not a named group of {settings.pattern!r}."
            )
        self.reference = _reference_template(self, settings.reference)

    def required_fields(self) -> tuple[str, ...]:
        return self.reference.fields

    def extract(self, response: str) -> Optional[str]:
        matches = list(self.regex.finditer(response))
        if not matches:
            return None
        m = matches[-1] if self.settings.select == "last" else matches[0]
        return m.group(self.settings.group)

    def _same(self, got: str, want: str) -> bool:
        if self.settings.numeric:
            try:
                return math.isclose(float(got.replace(",", "")), float(want.replace(",", "")), abs_tol=1e-9)
            except ValueError:
                return False
        if self.settings.ignore_case:
            return got.strip().casefold() == want.strip().casefold()
        return got.strip() == want.strip()

    def score_response(self, example: Any, response: str) -> ExampleScore:
        want = self.reference.render(example.data, example.where)
        got = self.extract(response)
        if got is None:
            return ExampleScore(0.0, "no match", response)
        ok = self._same(got, want)
        return ExampleScore(float(ok), "" if ok else f"extracted {got!r}, expected {want!r}", response)


class MultipleChoice(Scorer):
    """Pick the choice whose continuation is most likely; ``normalize`` as lm-eval's acc/acc_norm."""

    name = "multiple_choice"
    needs = "loglikelihood"

    class Settings(_Settings):
        choices_field: str = "choices"
        gold_field: str = "gold"
        continuation: str = "{choice}"
        normalize: Literal["none", "chars", "tokens"] = "none"

    def __init__(self, settings: Any, spec: Any, base_dir: Path) -> None:
        super().__init__(settings, spec, base_dir)
        if "{choice}" not in settings.continuation:
            raise ConfigError(
                f"Task {spec.name!r}: multiple_choice continuation {settings.continuation!r} must "
                "contain '{choice}'."
            )

    def required_fields(self) -> tuple[str, ...]:
        return (self.settings.choices_field, self.settings.gold_field)

    def _gold(self, data: Mapping[str, Any]) -> int:
        choices, gold = data[self.settings.choices_field], data[self.settings.gold_field]
        if isinstance(gold, str) and gold in choices:
            return choices.index(gold)
        return gold

    def check_example(self, data: Mapping[str, Any], where: str) -> None:
        choices = data[self.settings.choices_field]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: {self.settings.choices_field!r} must be a list of 2+ strings.")
        gold = self._gold(data)
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ConfigError(
                f"{where}: {self.settings.gold_field!r} is {data[self.settings.gold_field]!r}; it must be "
                f"an index 0..{len(choices) - 1} or one of the choices."
            )

    def continuation(self, choice: str) -> str:
        return self.settings.continuation.replace("{choice}", choice)

    def score(self, engine: Any, examples: Sequence[Any]) -> list[ExampleScore]:
        requests, owners = [], []
        for i, ex in enumerate(examples):
            for choice in ex.data[self.settings.choices_field]:
                requests.append((ex.prompt, self.continuation(choice)))
                owners.append(i)
        results = engine.loglikelihood(requests)
        per: list[list[float]] = [[] for _ in examples]
        for (_, cont), owner, res in zip(requests, owners, results):
            value = res.logprob
            if self.settings.normalize == "chars":
                value /= max(len(cont), 1)
            elif self.settings.normalize == "tokens":
                value /= max(res.num_tokens, 1)
            per[owner].append(value)
        out = []
        for ex, values in zip(examples, per):
            choices = ex.data[self.settings.choices_field]
            pick = max(range(len(values)), key=values.__getitem__)
            ok = pick == self._gold(ex.data)
            out.append(ExampleScore(float(ok), f"picked {choices[pick]!r}", choices[pick]))
        return out


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str) -> str:
    """The first fenced code block of a response, or the whole response if it has none."""
    m = _FENCE.search(response)
    return m.group(1) if m else response


class CodePass(GenerationScorer):
    """pass@1 with greedy decoding: the generated code runs against the example's tests in the sandbox."""

    name = "code_pass"

    class Settings(_Settings):
        tests_field: str = "tests"
        prefix: str = ""
        extract: Literal["fenced_or_raw", "raw"] = "fenced_or_raw"
        wall_s: float = Field(10.0, gt=0, le=600)
        cpu_s: float = Field(5.0, gt=0, le=600)
        memory_mb: int = Field(512, ge=32, le=65536)
        max_workers: int = Field(2, ge=1, le=256)

    def __init__(self, settings: Any, spec: Any, base_dir: Path) -> None:
        super().__init__(settings, spec, base_dir)
        from mergesearch.eval.tasks import Template

        self.prefix = Template.parse(settings.prefix, f"task {spec.name!r} code prefix")

    def required_fields(self) -> tuple[str, ...]:
        return (self.settings.tests_field, *self.prefix.fields)

    def check_example(self, data: Mapping[str, Any], where: str) -> None:
        tests = data[self.settings.tests_field]
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ConfigError(
                f"{where}: {self.settings.tests_field!r} must be a non-empty string or list of strings "
                "(Python statements such as 'assert f(2) == 4')."
            )
        try:
            compile("\n".join(tests), where, "exec")
        except SyntaxError as err:
            raise ConfigError(f"{where}: the tests are not valid Python ({err.msg}, line {err.lineno}).") from None

    def program(self, example: Any, response: str) -> str:
        code = extract_code(response) if self.settings.extract == "fenced_or_raw" else response
        return self.prefix.render(example.data, example.where) + code

    def score_responses(self, examples: Sequence[Any], responses: Sequence[str]) -> list[ExampleScore]:
        from mergesearch.eval.sandbox import SandboxLimits, run_many

        s = self.settings
        limits = SandboxLimits(wall_s=s.wall_s, cpu_s=s.cpu_s, memory_bytes=s.memory_mb * 2**20)
        items = []
        for ex, response in zip(examples, responses):
            tests = ex.data[s.tests_field]
            items.append((self.program(ex, response), tests if isinstance(tests, str) else "\n".join(tests)))
        results = run_many(items, limits=limits, max_workers=s.max_workers)
        return [
            ExampleScore(float(r.passed), r.reason if r.passed else f"{r.reason}: {r.detail}".rstrip(": "), resp)
            for r, resp in zip(results, responses)
        ]


class IFEval(GenerationScorer):
    """Verifiable instructions as IFEval checks them (``mergesearch.eval.ifeval``)."""

    name = "ifeval"

    class Settings(_Settings):
        instructions_field: str = "instructions"
        mode: Literal["strict", "loose"] = "strict"
        level: Literal["prompt", "instruction"] = "prompt"

    def required_fields(self) -> tuple[str, ...]:
        return (self.settings.instructions_field,)

    def check_example(self, data: Mapping[str, Any], where: str) -> None:
        from mergesearch.eval import ifeval

        items = data[self.settings.instructions_field]
        if not isinstance(items, list) or not items:
            raise ConfigError(
                f"{where}: {self.settings.instructions_field!r} must be a non-empty list of "
                "{id: ..., kwargs: {...}} objects."
            )
        for item in items:
            if not isinstance(item, dict) or "id" not in item:
                raise ConfigError(f"{where}: instruction {item!r} must be an object with an 'id'.")
            try:
                ifeval.validate(item["id"], item.get("kwargs") or {})
            except ConfigError as err:
                raise type(err)(f"{where}: {err}") from None

    def score_response(self, example: Any, response: str) -> ExampleScore:
        from mergesearch.eval import ifeval

        items = example.data[self.settings.instructions_field]
        followed = ifeval.check(response, items, prompt=example.prompt, mode=self.settings.mode)
        if self.settings.level == "prompt":
            value = float(all(followed))
        else:
            value = sum(followed) / len(followed)
        failed = [item["id"] for item, ok in zip(items, followed) if not ok]
        return ExampleScore(value, f"not followed: {', '.join(failed)}" if failed else "", response)


class _TokenScorer(Scorer):
    needs = "token_scores"

    def texts(self, examples: Sequence[Any]) -> list[str]:
        return [ex.prompt + (ex.target or "") for ex in examples]


class Perplexity(_TokenScorer):
    """exp(-mean token NLL) of the example text (prompt + target): 1 / perplexity."""

    name = "perplexity"

    def score(self, engine: Any, examples: Sequence[Any]) -> list[ExampleScore]:
        out = []
        for ts in engine.token_scores(self.texts(examples)):
            nll = -ts.logprobs.gather(-1, ts.targets.unsqueeze(-1)).mean().item()
            out.append(ExampleScore(math.exp(-nll), f"perplexity {math.exp(nll):.3f}"))
        return out


class Agreement(_TokenScorer):
    """Agreement with a reference model on the example texts.

    ``metric: argmax``: the fraction of positions where both models predict the same next
    token. ``metric: kl``: exp(-mean KL(reference || candidate)). The reference model
    (``reference``: a model folder, relative to the task file) is run once per text and its
    log-probabilities are cached in memory.
    """

    name = "agreement"

    class Settings(_Settings):
        reference: str
        metric: Literal["argmax", "kl"] = "argmax"

    def __init__(self, settings: Any, spec: Any, base_dir: Path) -> None:
        super().__init__(settings, spec, base_dir)
        path = Path(settings.reference)
        self.reference_dir = path if path.is_absolute() else base_dir / path
        self._reference_engine: Any = None
        self._cache: dict[str, Any] = {}

    def use_reference(self, engine: Any) -> None:
        """Score against an engine already holding the reference model (instead of loading one)."""
        self._reference_engine = engine
        self._cache.clear()

    def _reference(self, texts: Sequence[str]) -> list[Any]:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            if self._reference_engine is None:
                from mergesearch.eval.hf import TransformersEngine

                if not (self.reference_dir / "config.json").is_file():
                    raise ConfigError(
                        f"Task {self.spec.name!r}: reference model {str(self.reference_dir)!r} has no "
                        "config.json; point `reference` at a model folder (relative to the task file)."
                    )
                self._reference_engine = TransformersEngine(self.reference_dir)
            for text, ts in zip(todo, self._reference_engine.token_scores(todo)):
                self._cache[text] = ts
        return [self._cache[t] for t in texts]

    def score(self, engine: Any, examples: Sequence[Any]) -> list[ExampleScore]:
        texts = self.texts(examples)
        cand = engine.token_scores(texts)
        ref = self._reference(texts)
        out = []
        for c, r in zip(cand, ref):
            if c.logprobs.shape != r.logprobs.shape:
                raise ConfigError(
                    f"Task {self.spec.name!r}: the reference model tokenises or sizes its vocabulary "
                    f"differently ({tuple(r.logprobs.shape)} vs {tuple(c.logprobs.shape)}); use a "
                    "reference with the candidate's tokenizer."
                )
            if self.settings.metric == "argmax":
                same = (c.logprobs.argmax(-1) == r.logprobs.argmax(-1)).float().mean().item()
                out.append(ExampleScore(same, f"argmax agreement {same:.3f}"))
            else:
                kl = (r.logprobs.exp() * (r.logprobs - c.logprobs)).sum(-1).mean().clamp_min(0).item()
                out.append(ExampleScore(math.exp(-kl), f"KL {kl:.4f}"))
        return out


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (ExactMatch, RegexMatch, MultipleChoice, CodePass, IFEval, Agreement, Perplexity)
}


def make_scorer(spec: Any, source: str, base_dir: Path) -> Scorer:
    """Instantiate the task's scorer with validated settings."""
    name = spec.scorer.name
    if name not in SCORERS:
        raise unknown("scorer", name, SCORERS, source)
    cls = SCORERS[name]
    try:
        settings = cls.Settings.model_validate(spec.scorer.settings)
    except ValidationError as err:
        raise ConfigError(f"{source}: scorer {name!r} settings: {format_validation(err)}") from None
    return cls(settings, spec, base_dir)
