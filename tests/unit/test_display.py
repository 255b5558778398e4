"""What a user sees: a Titanax object as a notebook cell's last expression shows the table people
read, in text consoles (IPython's ``_repr_pretty_``) and as HTML, never a wall of dataclass fields;
a Titanax warning names the user's line, not the library's."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

import titanax as tx


class _Printer:
    """IPython's pretty printer, as much of it as ``_repr_pretty_`` uses."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, text: str) -> None:
        self.parts.append(text)


def _pretty(obj) -> str:
    printer = _Printer()
    obj._repr_pretty_(printer, False)
    return "".join(printer.parts)


def test_describe_layout_stats_and_state_show_as_tables():
    mesh = tx.MeshSpec(axes=("data",)).build()
    plan = tx.Plan(data_parallel=tx.DP())
    x = jnp.ones((8, 4))
    sm = tx.shard(nn.Dense(2), plan, mesh, example=x)
    engine = tx.Engine(mesh=mesh, plan=plan, optimizer=tx.optim.adamw(1e-3))
    state = engine.init(nn.Dense(2), example=x)
    stats = tx.profiling.inspect(sm.lower(x).compile())
    shown = {"describe": _pretty(sm.describe()), "layout": _pretty(sm.layout), "inspect": _pretty(stats),
             "state": _pretty(state)}
    assert shown["describe"] == str(sm.describe()) and "\n" in shown["describe"]  # printed, not quoted
    assert shown["layout"] == sm.layout.describe() and "kernel" in shown["layout"]
    assert shown["inspect"] == stats.describe()
    lines = shown["state"].splitlines()
    assert lines[0].startswith("TrainState at step 0 on mesh data=8: 10 parameters in 2 arrays"), lines[0]
    assert any(line.startswith("params['kernel']") and "(4, 2)" in line for line in lines), shown["state"]
    assert any(line.startswith("opt_state") and "mu" in line for line in lines), shown["state"]
    assert "Array(" not in shown["state"] and "dtype=float32)" not in shown["state"]
    for obj in (sm.describe(), sm.layout, stats, state):
        html = obj._repr_html_()
        assert html.lstrip().startswith("<") and ("kernel" in html or "FLOP" in html)


def test_a_titanax_warning_points_at_the_users_line():
    import warnings

    mesh = tx.MeshSpec(axes=("data",)).build()
    rules = tx.Rules(rules=(("embed", "data"),), params=((r"no/such/path", ("embed",)),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tx.shard(nn.Dense(2), rules, mesh, example=jnp.ones((8, 4)))  # the path rule matches nothing
    ours = [w for w in caught if issubclass(w.category, tx.TitanaxWarning)]
    assert ours and "matched no array" in str(ours[0].message)
    assert ours[0].filename == __file__, ours[0].filename  # this line, not the library's
