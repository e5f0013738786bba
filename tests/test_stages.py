"""Cached pipeline stages: reused when their config and inputs are unchanged, redone otherwise."""
import os

from energyflow.stages import Stage, config_key


def test_stage_runs_once_and_is_reused(tmp_path):
    calls = []

    def work(path):
        calls.append(path)
        with open(os.path.join(path, "out.txt"), "w") as f:
            f.write("x")
        return {"value": 3}

    a = Stage("behaviour", {"lr": 1e-3}, str(tmp_path))
    assert not a.done
    assert a.run(work)["value"] == 3
    assert a.done and len(calls) == 1
    again = Stage("behaviour", {"lr": 1e-3}, str(tmp_path))
    assert again.run(work)["value"] == 3 and len(calls) == 1  # cached
    assert os.path.exists(again.file("out.txt"))


def test_changing_a_config_invalidates_that_stage_and_downstream_only(tmp_path):
    root = str(tmp_path)
    behaviour = Stage("behaviour", {"steps": 10}, root)
    critic = Stage("critic", {"alpha": 0.1}, root, upstream=[behaviour])
    rounds = Stage("rounds", {"beta": 1.0}, root, upstream=[behaviour, critic])
    for s in (behaviour, critic, rounds):
        s.finish()
    # a new beta: only the rounds stage changes
    rounds_b3 = Stage("rounds", {"beta": 3.0}, root, upstream=[behaviour, critic])
    assert behaviour.done and critic.done and not rounds_b3.done
    # a new critic temperature: critic and rounds change, behaviour is reused
    critic2 = Stage("critic", {"alpha": 1.0}, root, upstream=[behaviour])
    rounds2 = Stage("rounds", {"beta": 1.0}, root, upstream=[behaviour, critic2])
    assert not critic2.done and not rounds2.done
    assert critic2.key != critic.key and rounds2.key != rounds.key


def test_a_stage_killed_before_finish_is_not_done(tmp_path):
    stage = Stage("critic", {"a": 1}, str(tmp_path))

    def crash(path):
        raise KeyboardInterrupt

    try:
        stage.run(crash)
    except KeyboardInterrupt:
        pass
    assert not stage.done
    assert config_key({"a": 1}) == config_key({"a": 1}) != config_key({"a": 2})
