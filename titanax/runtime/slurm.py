"""SLURM host lists: ``node[01-04,07],login1`` into host names, so process 0's host is known.

JAX's own SLURM detection reads only the text before the first ``,`` or ``-`` of
``SLURM_STEP_NODELIST``, which is right for ``node[01-04]`` but names host ``rack1`` for
``rack[1-2]-n[1,3]`` (the first host is ``rack1-n1``). Titanax needs process 0's host before JAX
starts (its start-up rendezvous listens there), so it parses the whole grammar and names the variable
when a list is malformed.
"""

from __future__ import annotations

from titanax.exceptions import DistributedError

__all__ = ["parse_slurm_nodelist"]


def parse_slurm_nodelist(nodelist: str, *, variable: str = "nodelist") -> list[str]:
    """Expands a SLURM host list such as ``node[01-04,07],login1`` into host names.

    Handles comma-separated hosts, bracketed ranges and lists (zero padding kept), and several
    bracket groups in one name (``rack[1-2]-n[1-2]``). SLURM lists the hosts of a step in the order
    it places tasks, so the first host runs process 0.

    Args:
      nodelist: the value of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``.
      variable: the variable it came from, named in errors.

    Returns:
      The host names, in order.

    Raises:
      DistributedError: the list is empty or malformed (unbalanced brackets, a bad range).

    Example:
      >>> parse_slurm_nodelist("node[01-03,07],gpu5")
      ['node01', 'node02', 'node03', 'node07', 'gpu5']
    """

    def bad(why: str) -> DistributedError:
        return DistributedError(
            f"{variable}={nodelist!r} is not a SLURM host list: {why}",
            suggestion="run under srun/sbatch so SLURM sets it, or set TITANAX_COORDINATOR_ADDRESS="
            "<host of process 0>:<port> yourself",
        )

    def expand_group(body: str) -> list[str]:
        out: list[str] = []
        for part in body.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise bad(f"range {part!r} is not N or N-M")
            if not sep:
                out.append(lo)
                continue
            if int(hi) < int(lo):
                raise bad(f"range {part!r} runs backwards")
            # SLURM pads every number of a range to the width of its first bound (`[08-10]`).
            out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        return out

    def expand_host(pattern: str) -> list[str]:
        hosts = [""]
        rest = pattern
        while rest:
            open_at = rest.find("[")
            if open_at < 0:
                if "]" in rest:
                    raise bad("']' without '['")
                hosts = [h + rest for h in hosts]
                break
            close_at = rest.find("]", open_at)
            if close_at < 0:
                raise bad("'[' without ']'")
            literal, body = rest[:open_at], rest[open_at + 1 : close_at]
            if "]" in literal:
                raise bad("']' without '['")
            hosts = [h + literal + n for h in hosts for n in expand_group(body)]
            rest = rest[close_at + 1 :]
        return hosts

    # Split on commas outside brackets only: `node[1,3],login` is two patterns, not three.
    patterns, depth, current = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            patterns.append(current)
            current = ""
        else:
            current += ch
    patterns.append(current)
    hosts = [h for p in patterns if p.strip() for h in expand_host(p.strip())]
    if not hosts:
        raise bad("no hosts in it")
    return hosts
