"""Grain input pipelines: a run saved on 8 devices resumes on 4 with every record of the epoch seen
exactly once; the per-process slicing for 2 processes; the GPT example fed by Grain; misuse."""

from __future__ import annotations

import json
import pathlib
import sys

import grain
import jax
import numpy as np
import pytest

import models
import titanax as tx
from titanax import config as txconfig

RECORDS, BATCH = 96, 16  # 6 global batches an epoch; 16 divides over 8 and over 4 devices
CONFIGS = pathlib.Path(__file__).parents[2] / "examples" / "configs"


def _record(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"id": np.int32(i), "x": rng.normal(size=models.EMBED).astype(np.float32),
            "y": rng.normal(size=models.EMBED).astype(np.float32)}


def _dataset() -> grain.MapDataset:
    return grain.MapDataset.range(RECORDS).map(_record)


class _Recorder(tx.data.DevicePrefetcher):
    """The engine's own prefetcher (look-ahead 2) that notes the ids of each batch it hands out."""

    seen: list[list[int]]

    def __next__(self):
        batch = super().__next__()
        self.seen.append(np.asarray(batch["id"]).tolist())
        return batch


def _fit(devices: int, directory: str, steps: int) -> tuple[list[list[int]], tx.TrainState]:
    mesh = tx.MeshSpec(axes=("data",), devices=jax.devices()[:devices]).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"))
    engine = tx.Engine(mesh=mesh, plan=plan, optimizer=tx.optim.sgd(0.05), log_every=100,
                       checkpoint=tx.io.OrbaxCheckpoint(directory, every=100, async_save=False))
    engine.init(lambda rngs: models.NNXMLP(rngs))
    data = _Recorder(tx.data.GrainLoader(_dataset(), batch_size=BATCH, seed=7), mesh=mesh, rules_or_plan=plan)
    data.seen = []
    state = engine.fit(models.regression_step, data, steps=steps)
    engine.checkpoint.close()
    return data.seen, state


def test_a_run_saved_on_8_devices_resumes_on_4_seeing_each_record_once(tmp_path):
    directory = str(tmp_path / "run")
    first, state = _fit(8, directory, steps=2)  # stops after 2 of the epoch's 6 batches, saving step 2
    assert int(state.step) == 2 and len(first) == 2
    saved = tx.io.OrbaxCheckpoint(directory)
    _, data_state = saved.restore(state)
    saved.close()
    # The global stream position, though the prefetcher had pulled a third batch from Grain.
    assert data_state["grain"] == {"global_next_index": 2 * BATCH}
    assert (data_state["epoch"], data_state["position"]) == (0, 2 * BATCH)
    second, state = _fit(4, directory, steps=6)  # resumes at step 3 on a mesh of 4 devices
    assert int(state.step) == 6 and len(second) == 4
    ids = sorted(i for batch in first + second for i in batch)
    assert ids == list(range(RECORDS))  # each record of the epoch exactly once
    # And in the order an uninterrupted loader gives: the same global batches.
    whole = tx.data.GrainLoader(_dataset(), batch_size=BATCH, seed=7)
    assert [sorted(b) for b in first + second] == [sorted(next(whole)["id"].tolist()) for _ in range(6)]


def _ids(loader: tx.data.GrainLoader) -> list[int]:
    return next(loader)["id"].tolist()


def test_two_processes_split_each_global_batch_and_resume_on_any_count():
    def loader(index: int, count: int, batch: int = BATCH, **kw) -> tx.data.GrainLoader:
        return tx.data.GrainLoader(_dataset(), batch_size=batch, seed=3, process_index=index,
                                   process_count=count, **kw)

    one, halves = loader(0, 1), [loader(0, 2), loader(1, 2)]
    seen = []  # the records the job consumed, in order
    for _ in range(2):
        whole = _ids(one)
        parts = [_ids(h) for h in halves]
        seen += parts[0] + parts[1]
        assert [len(p) for p in parts] == [BATCH // 2] * 2 and halves[0].local_batch_size == BATCH // 2
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)
        assert parts == [whole[0::2], whole[1::2]]  # Grain's ElasticIterator: record k to process k % P
    # The state is global: identical on both processes and on the single-process loader.
    assert halves[0].state() == halves[1].state() == one.state()
    saved = json.loads(json.dumps(halves[1].state()))
    assert saved["grain"] == {"global_next_index": 2 * BATCH} and saved["position"] == 2 * BATCH
    # 2 processes -> 4 processes with a batch of 8, then -> 1 process: the epoch, exactly once.
    quarters = [loader(p, 4, batch=8).restore(saved) for p in range(4)]
    for _ in range(3):
        seen += [i for q in quarters for i in _ids(q)]
    assert quarters[0].state()["grain"] == {"global_next_index": 2 * BATCH + 3 * 8}
    last = loader(0, 1).restore(quarters[2].state())
    while last.epoch == 0:
        seen += _ids(last)
    # 56 records consumed, 40 left: the third batch of 16 ends with 8 records of epoch 1.
    assert len(seen) == RECORDS + 8 and sorted(seen[:RECORDS]) == list(range(RECORDS))
    stream = _dataset().shuffle(seed=3).repeat()  # the global order: Grain's, reseeded per epoch
    assert seen[RECORDS:] == [stream[RECORDS + k]["id"] for k in range(8)]
    # epochs= stops before the first batch past the end; each epoch is reshuffled.
    two = loader(0, 1, epochs=2)
    epochs = [i for batch in two for i in batch["id"].tolist()]
    assert sorted(epochs[:RECORDS]) == sorted(epochs[RECORDS:]) == list(range(RECORDS))
    assert epochs[:RECORDS] != epochs[RECORDS:]


def test_the_gpt_example_trains_from_grain():
    # One layer, two steps, no evaluation: what is new here is the data path, not the model.
    cfg = txconfig.load(CONFIGS / "gpt_tiny_grain.yaml",
                        ["train.steps=2", "optimizer.warmup_steps=1", "logging.every=2",
                         "train.eval_step=null", "model.args.num_layers=1", "data.args.max_bytes=800000"])
    assert cfg.data.args["loader"] == "grain"
    run = txconfig.prepare(cfg, loggers=False, checkpoint=False)
    loader = run.source.train_batches()
    assert isinstance(loader, tx.data.GrainLoader) and "read through Grain" in run.source.description
    tokens = next(loader)["tokens"]
    assert tokens.shape == (cfg.data.batch_size, cfg.data.args["seq_len"] + 1) and tokens.dtype == np.uint16
    assert loader.state()["grain"] == {"global_next_index": cfg.data.batch_size}
    assert txconfig.train(cfg, echo=lambda line: None)["step"] == 2


def test_misuse_is_a_config_error_with_a_suggestion(monkeypatch):
    with pytest.raises(tx.ConfigError, match=r"batch_size=12 does not divide over 8 processes") as err:
        tx.data.GrainLoader(_dataset(), batch_size=12, process_index=0, process_count=8)
    assert err.value.suggestion == "use a multiple of 8, e.g. 8 or 16" and err.value.field == "batch_size"
    with pytest.raises(tx.ConfigError, match=r"larger than the dataset \(96 records\)"):
        tx.data.GrainLoader(_dataset(), batch_size=128)
    with pytest.raises(tx.ConfigError, match=r"needs random access .* got a .*IterDataset") as err:
        tx.data.GrainLoader(_dataset().to_iter_dataset(), batch_size=BATCH)
    assert "grain.MapDataset" in err.value.suggestion
    with pytest.raises(tx.ConfigError, match=r"cannot resume this dataset exactly: .*filter"):
        tx.data.GrainLoader(_dataset().filter(lambda r: r["id"] % 2 == 0), batch_size=BATCH)
    with pytest.raises(tx.ConfigError, match=r"process_index=2 must be an integer in \[0, 1\]"):
        tx.data.GrainLoader(_dataset(), batch_size=BATCH, process_index=2, process_count=2)
    saved = tx.data.GrainLoader(_dataset(), batch_size=BATCH, seed=1).state()
    with pytest.raises(tx.ConfigError, match=r"different record stream \(seed: saved 1, this loader 2\)"):
        tx.data.GrainLoader(_dataset(), batch_size=BATCH, seed=2).restore(saved)
    with pytest.raises(tx.ConfigError, match=r"not a GrainLoader state"):
        tx.data.GrainLoader(_dataset(), batch_size=BATCH).restore({"epoch": 0, "position": 3})
    mesh = tx.MeshSpec(axes=("data",)).build()
    with pytest.raises(tx.ShardingError, match=r"the GrainLoader loads part 1 of 2 .* part 0 of 1"):
        tx.data.prefetch_to_device(tx.data.GrainLoader(_dataset(), batch_size=BATCH, process_index=1,
                                                       process_count=2),
                                   mesh=mesh, rules_or_plan=tx.Plan(data_parallel=tx.DP(axis="data")))
    monkeypatch.setitem(sys.modules, "grain", None)  # `import grain` now raises ImportError
    with pytest.raises(tx.ConfigError, match=r"needs the 'grain' package") as err:
        tx.data.GrainLoader(list(range(RECORDS)), batch_size=BATCH)
    assert "pip install 'titanax[grain]'" in err.value.suggestion
