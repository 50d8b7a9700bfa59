"""The built-in rules, each with a plain-language suggested action.

Every factory returns a ``Rule`` whose thresholds and durations can be changed by keyword; ``builtin_rules()``
returns them all with their defaults.  Durations are in optimizer steps.  The defaults assume the monitor's default
smoothing (a half-life of 25 steps): rules wait ``warmup`` steps for the averages to settle and compare values
over spans of that order.  Conditions that use the band (``b_simple_low``, ``b_simple_high``) fire only when the
whole band is past the threshold, so an estimate too uncertain to tell raises nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from noisescale.alerts.rule import Check, CheckResult, History, LayerBand, Rule
from noisescale.errors import ConfigError

__all__ = [
    "batch_above_noise",
    "batch_below_noise",
    "builtin_rules",
    "grad_sq_unreliable",
    "layer_outlier",
    "loss_stalled",
    "noise_jump",
    "nonfinite_steps",
]

DEFAULT_WARMUP = 50


def batch_below_noise(
    *, factor: float = 10.0, hold_for: float = 100, clear_for: float = 50, warmup: float = DEFAULT_WARMUP
) -> Rule:
    """The batch is far below B_simple for long: each step's update is dominated by noise.

    Active when ``b_simple_low >= factor * batch_size``; the value is ``b_simple / batch_size``.
    """
    _positive("factor", factor, above=1.0)

    def check(history: History) -> CheckResult:
        o = history.latest
        b, low = o.values.get("b_simple"), o.values.get("b_simple_low")
        if o.status != "ok" or b is None or low is None:
            return None
        return Check(
            low >= factor * o.batch_size,
            value=b / o.batch_size,
            message=f"the batch size {o.batch_size} is far below the noise scale B_simple = {b:.4g} "
            f"({b / o.batch_size:.3g}x): updates are dominated by gradient noise",
        )

    return Rule(
        name="batch_below_noise",
        check=check,
        summary="the batch size is far below the noise scale B_simple: updates are dominated by gradient noise",
        action="raise the batch size toward B_simple, or lower the learning rate",
        hold_for=hold_for,
        clear_for=clear_for,
        warmup=warmup,
    )


def batch_above_noise(
    *, factor: float = 10.0, hold_for: float = 100, clear_for: float = 50, warmup: float = DEFAULT_WARMUP
) -> Rule:
    """The batch is far above B_simple: most of each batch's examples buy almost no progress.

    Active when ``batch_size >= factor * b_simple_high``; the value is ``batch_size / b_simple``.
    """
    _positive("factor", factor, above=1.0)

    def check(history: History) -> CheckResult:
        o = history.latest
        b, high = o.values.get("b_simple"), o.values.get("b_simple_high")
        if o.status != "ok" or b is None or high is None or b <= 0:
            return None
        return Check(
            o.batch_size >= factor * high,
            value=o.batch_size / b,
            message=f"the batch size {o.batch_size} is far above the noise scale B_simple = {b:.4g} "
            f"({o.batch_size / b:.3g}x): most examples of each batch are wasted",
        )

    return Rule(
        name="batch_above_noise",
        check=check,
        summary="the batch size is far above the noise scale B_simple: most examples of each batch are wasted",
        action="lower the batch size toward B_simple (and the learning rate with it)",
        hold_for=hold_for,
        clear_for=clear_for,
        warmup=warmup,
    )


def noise_jump(
    *,
    factor: float = 3.0,
    over: float = 10,
    layers: bool = True,
    clear_for: float = 50,
    warmup: float = DEFAULT_WARMUP,
) -> Rule:
    """B_simple, or one layer's, moved by ``factor`` or more within ``over`` steps: the data probably changed.

    Active when the value now and ``over`` steps ago differ by ``factor`` (either way) *and* their bands do not
    overlap; fires at once.  With ``layers``, each parameter tensor is watched too, as its own alert.
    """
    _positive("factor", factor, above=1.0)
    _positive("over", over)

    def jump(now: LayerBand, then: LayerBand, what: str, layer: str | None) -> Check | None:
        if None in (now.b_simple, then.b_simple, now.low, now.high, then.low, then.high):
            return None
        assert now.b_simple is not None and then.b_simple is not None
        if now.b_simple <= 0 or then.b_simple <= 0:
            return None
        ratio = now.b_simple / then.b_simple
        assert now.low is not None and now.high is not None and then.low is not None and then.high is not None
        apart = now.low > then.high or now.high < then.low
        direction = "rose" if ratio > 1 else "fell"
        return Check(
            apart and (ratio >= factor or ratio <= 1.0 / factor),
            value=ratio,
            layer=layer,
            message=f"{what} {direction} from {then.b_simple:.4g} to {now.b_simple:.4g} (x{ratio:.3g}) within "
            f"{over:g} steps",
        )

    def check(history: History) -> CheckResult:
        now, then = history.latest, history.before(over)
        if then is None or now.status != "ok" or then.status != "ok":
            return None
        out = []
        whole = jump(_band(now.values), _band(then.values), "B_simple", None)
        if whole is not None:
            out.append(whole)
        if layers:
            for name, band in now.layers.items():
                before = then.layers.get(name)
                c = None if before is None else jump(band, before, f"B_simple of {name}", name)
                if c is not None:
                    out.append(c)
        return out

    return Rule(
        name="noise_jump",
        check=check,
        summary="the noise scale B_simple jumped: the data seen by the model probably changed",
        action="check the latest data shard (corrupted, duplicated or mislabelled examples, a changed mix)",
        clear_for=clear_for,
        window=over,
        warmup=warmup,
        layers=layers,
    )


def grad_sq_unreliable(
    *,
    fraction: float = 0.3,
    window: float = 50,
    min_count: int = 10,
    band_ratio: float | None = 4.0,
    hold_for: float = 25,
    clear_for: float = 50,
    warmup: float = DEFAULT_WARMUP,
) -> Rule:
    """This step's unbiased |G|^2 estimate (``grad_sq_raw``) is <= 0 too often, and B_simple's band is wide.

    Active when at least ``fraction`` of the defined ``grad_sq_raw`` values within ``window`` steps (and at least
    ``min_count`` of them) are not positive, *and* the smoothed band is wide: ``b_simple_high >= band_ratio *
    b_simple_low`` (or unbounded).  A single step's |G|^2 is often negative when B_simple is well above the batch;
    the smoothing is there for that, so only a wide band makes the estimate unreliable (``band_ratio=None``
    ignores the band).  The value is the fraction.
    """
    if not (0.0 < fraction <= 1.0):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    _positive("window", window)
    if band_ratio is not None:
        _positive("band_ratio", band_ratio, above=1.0)

    def check(history: History) -> CheckResult:
        raw = history.values("grad_sq_raw", window)
        if len(raw) < min_count:
            return None
        share = sum(1 for v in raw if v <= 0) / len(raw)
        low, high = history.latest.values.get("b_simple_low"), history.latest.values.get("b_simple_high")
        wide = band_ratio is None or low is None or high is None or high >= band_ratio * low
        band = "" if low is None or high is None else f", band [{low:.4g}, {high:.4g}]"
        return Check(
            share >= fraction and wide,
            value=share,
            message=f"|G|^2 was estimated non-positive at {share:.0%} of the last {len(raw)} measured steps{band}: "
            "the noise scale is dominated by estimation noise",
        )

    return Rule(
        name="grad_sq_unreliable",
        check=check,
        summary="|G|^2 is estimated non-positive too often: B_simple is unreliable",
        action="measure more small batches per step (per-example norms, more micro-batches) or use a longer halflife",
        hold_for=hold_for,
        clear_for=clear_for,
        window=window,
        warmup=warmup,
    )


def loss_stalled(
    *,
    metric: str = "loss",
    window: float = 200,
    min_improvement: float = 0.01,
    min_count: int = 5,
    clear_for: float = 50,
    warmup: float = DEFAULT_WARMUP,
) -> Rule:
    """The loss stopped improving while the gradient noise is low: there is little noise left to explore with.

    Compares the mean of ``metric`` over the last ``window / 2`` steps with the mean over the ``window / 2``
    before: active when it moved by less than ``min_improvement`` (relative) either way *and* B_simple's whole band
    is below the batch size.  A loss that rises is no plateau (bad data, instability: other rules speak of that).
    The value is the relative improvement.
    """
    _positive("window", window)
    half = window / 2

    def check(history: History) -> CheckResult:
        o = history.latest
        if history.before(window) is None:  # not yet two full halves of history
            return None
        recent = [v for w in history.window(half) if (v := w.metrics.get(metric)) is not None]
        earlier = [
            v for w in history.window(window) if o.step - w.step >= half and (v := w.metrics.get(metric)) is not None
        ]
        high = o.values.get("b_simple_high")
        if len(recent) < min_count or len(earlier) < min_count or high is None or o.status != "ok":
            return None
        before, now = statistics.fmean(earlier), statistics.fmean(recent)
        gain = (before - now) / abs(before) if before != 0 else 0.0
        return Check(
            abs(gain) < min_improvement and high < o.batch_size,
            value=gain,
            message=f"the {metric} changed by {-gain:+.2%} over the last {half:g} steps while B_simple "
            f"(at most {high:.4g}) is below the batch size {o.batch_size}: exploration is exhausted",
        )

    return Rule(
        name="loss_stalled",
        check=check,
        summary="the loss stopped improving while the gradient noise is low: exploration is exhausted",
        action="lower the batch size or raise the learning rate to add noise, decay the learning rate, or stop here",
        severity="info",
        clear_for=clear_for,
        window=window,
        warmup=warmup,
    )


def nonfinite_steps(*, count: int = 3, window: float = 100, clear_for: float = 100) -> Rule:
    """Steps with non-finite gradients (NaN/inf, a mixed-precision overflow) pile up.

    Active when at least ``count`` steps were skipped within ``window`` steps (``Measurement.skipped_steps``
    counts every skipped step, measured or not); the value is that number.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be a positive int, got {count!r}")
    _positive("window", window)

    def check(history: History) -> CheckResult:
        o = history.latest
        then = history.before(window)
        base = then.skipped_steps if then is not None else 0
        n = o.skipped_steps - base
        return Check(
            n >= count,
            value=float(n),
            message=f"{n} steps had non-finite gradients (NaN or inf) within {window:g} steps",
        )

    return Rule(
        name="nonfinite_steps",
        check=check,
        summary="steps with non-finite gradients (NaN, inf, overflow) are piling up",
        action="lower the learning rate, check the data and the loss for NaN/inf, clip gradients, or use bf16",
        severity="critical",
        clear_for=clear_for,
        window=window,
    )


def layer_outlier(
    *,
    factor: float = 30.0,
    kind: str = "module",
    min_layers: int = 3,
    hold_for: float = 100,
    clear_for: float = 50,
    warmup: float = DEFAULT_WARMUP,
) -> Rule:
    """One layer's noise scale is far from the others' (each layer its own alert).

    Active for a layer whose whole band lies ``factor`` times above or below the median B_simple of the layers
    (``kind``: ``"module"`` or ``"param"``; at least ``min_layers`` with a value); the value is its ratio to the
    median.
    """
    _positive("factor", factor, above=1.0)
    if kind not in ("module", "param"):
        raise ConfigError(f"kind must be 'module' or 'param', got {kind!r}")

    def check(history: History) -> CheckResult:
        o = history.latest
        bands: Mapping[str, LayerBand] = o.modules if kind == "module" else o.layers
        defined = {n: b for n, b in bands.items() if b.b_simple is not None and b.b_simple > 0}
        if o.status != "ok" or len(defined) < min_layers:
            return None
        median = math.exp(statistics.median(math.log(b.b_simple) for b in defined.values() if b.b_simple))
        out = []
        for name, b in defined.items():
            assert b.b_simple is not None
            ratio = b.b_simple / median
            far = (b.low is not None and b.low > factor * median) or (b.high is not None and b.high < median / factor)
            side = "above" if ratio > 1 else "below"
            out.append(
                Check(
                    far,
                    value=ratio,
                    layer=name,
                    message=f"B_simple of {name} = {b.b_simple:.4g} is {max(ratio, 1 / ratio):.3g}x {side} the median "
                    f"of the layers ({median:.4g})",
                )
            )
        return out

    return Rule(
        name="layer_outlier",
        check=check,
        summary="one layer's noise scale is far from the other layers'",
        action="inspect that layer: its learning rate, initialisation and normalisation, or the inputs it sees",
        severity="info",
        hold_for=hold_for,
        clear_for=clear_for,
        warmup=warmup,
        layers=True,
    )


def builtin_rules() -> list[Rule]:
    """Every built-in rule with its default settings."""
    return [
        batch_below_noise(),
        batch_above_noise(),
        noise_jump(),
        grad_sq_unreliable(),
        loss_stalled(),
        nonfinite_steps(),
        layer_outlier(),
    ]


def _band(values: Mapping[str, float | None]) -> LayerBand:
    return LayerBand(values.get("b_simple"), values.get("b_simple_low"), values.get("b_simple_high"))


def _positive(what: str, value: float, *, above: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= above:
        raise ConfigError(f"{what} must be a number above {above:g}, got {value!r}")
