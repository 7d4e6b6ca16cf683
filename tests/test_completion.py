"""Shell completion through click: the scripts, and uni_ids completed from the state directory."""

from __future__ import annotations

import json

import pytest

from .helpers import clean_env, run_gpu_compete


@pytest.mark.parametrize("shell,needle", [("bash", "complete -o nosort -F"), ("zsh", "#compdef gpu-compete"),
                                          ("fish", "complete --no-files --command gpu-compete")])
def test_completion_scripts(shell, needle):
    """`gpu-compete completion SHELL` prints click's script for that shell."""
    out = run_gpu_compete("completion", shell, env=clean_env())
    assert out.returncode == 0 and needle in out.stdout and "_GPU_COMPETE_COMPLETE" in out.stdout


def test_uni_ids_complete_from_registry_and_logs(tmp_path):
    """`logs` completes uni_ids from the registry and from the logs of --state-dir (or GPU_COMPETE_STATE_DIR)."""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "uni_id.json").write_text(json.dumps({"q1-2-bbbb": {"state": "running", "pid": 1}}))
    (state / "logs" / "q1-1-aaaa.log").write_text("x")
    (state / "logs" / "q2-1-cccc.log").write_text("x")
    env = clean_env(_GPU_COMPETE_COMPLETE="bash_complete", COMP_WORDS=f"gpu-compete logs --state-dir {state} q1",
                    COMP_CWORD="4")
    out = run_gpu_compete(env=env)
    assert out.stdout.split() == ["plain,q1-1-aaaa", "plain,q1-2-bbbb"]
    env = clean_env(_GPU_COMPETE_COMPLETE="bash_complete", COMP_WORDS="gpu-compete logs ", COMP_CWORD="2",
                    GPU_COMPETE_STATE_DIR=str(state))
    assert run_gpu_compete(env=env).stdout.split() == ["plain,q1-1-aaaa", "plain,q1-2-bbbb", "plain,q2-1-cccc"]
