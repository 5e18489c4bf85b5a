"""Scheduled runs: the deployments `facedata serve` builds, and a served run against a real
`prefect server start` that finds its input unchanged and does nothing new."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from facedata.core.config import load_config
from facedata.core.errors import UserError
from facedata.ingest.reader import InputError, plan_shards
from tests.conftest import REPO, PrefectServer, facedata_cmd, stop_process_group, wait_for
from tests.test_flow import check_run_consistent, file_mtimes, write_config, write_corpus

def parse_serve(*argv: str):
    from flows.deploy import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_curation_deployment(tmp_path, prefect_settings):
    from flows.dask_runner import FacedataDaskTaskRunner
    from flows.deploy import build_deployments, build_specs

    cfg_path = REPO / "configs" / "demo.yaml"
    args = parse_serve(str(cfg_path), "--cron", "30 3 * * 1-5", "--timezone", "Europe/Paris", "--name", "nightly",
                       "--output", str(tmp_path / "run"), "--set", "runner.kind=dask",
                       "--set", "runner.flow_retries=2", "--set", "runner.flow_retry_delay_s=5")
    [deployment] = build_deployments(args)
    assert (deployment.flow_name, deployment.name) == ("curate", "nightly")
    assert deployment.entrypoint == "flows/curate.py:curate"
    [schedule] = deployment.schedules
    assert schedule.active and schedule.schedule.cron == "30 3 * * 1-5"
    assert schedule.schedule.timezone == "Europe/Paris"
    expected = load_config(cfg_path, ["runner.kind=dask", "runner.flow_retries=2", "runner.flow_retry_delay_s=5"])
    assert deployment.parameters == {"config": expected.model_dump(mode="json"), "run_dir": str(tmp_path / "run"),
                                     "progress": False}
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    # The flow object the runner executes for each run carries the config's task runner and retries.
    [(flow, options)] = build_specs(args)
    assert isinstance(flow.task_runner, FacedataDaskTaskRunner)
    assert flow.task_runner.cluster_kwargs["n_workers"] == expected.runner.max_workers
    assert (flow.retries, flow.retry_delay_seconds) == (2, 5)
    assert options["parameters"] == deployment.parameters


def test_default_schedule_and_training_deployment(prefect_settings):
    from flows.deploy import DEFAULT_CRON, build_deployments

    args = parse_serve(str(REPO / "configs" / "demo.yaml"), "--train-config", str(REPO / "configs" / "flip_tiny.yaml"),
                       "--train-cron", "0 5 * * 0")
    curation, training = build_deployments(args)
    assert curation.name == "demo" and curation.schedules[0].schedule.cron == DEFAULT_CRON == "0 2 * * *"
    assert Path(curation.parameters["run_dir"]).is_absolute()
    assert (training.flow_name, training.name) == ("train-flip", "flip_tiny")
    assert training.schedules[0].schedule.cron == "0 5 * * 0"
    assert set(training.parameters) == {"config", "progress"}
    # No --train-cron: the training deployment runs on demand only.
    _, on_demand = build_deployments(parse_serve(str(REPO / "configs" / "demo.yaml"),
                                                 "--train-config", str(REPO / "configs" / "flip_tiny.yaml")))
    assert not on_demand.schedules


def test_bad_cron_and_missing_server(prefect_settings):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import build_deployments, check_server

    with pytest.raises(UserError, match="--cron: Invalid cron string"):
        build_deployments(parse_serve(str(REPO / "configs" / "demo.yaml"), "--cron", "every night"))
    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(UserError, match="server start"):
        check_server()


def _flow_run_processes(pid: int) -> list[int]:
    """Children of `pid` running a flow run (multiprocessing spawn), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


# Every stage's done marker and output.
STAGE_FILES = ("_plan/*", "shards/*", "faces/*", "identity/*", "captions/*")


@pytest.mark.slow
def test_served_run_of_unchanged_input_does_nothing_new(tmp_path, web, web_root, cli_env):
    """Curate once; serve the config against a real Prefect server; the deployment is there with its
    schedule and parameters; a run of it finds every shard done and rewrites none of them. Then a
    changed input is refused by the planning step the flow starts with."""
    photos = sorted(p.name for p in web_root.glob("*_amateur_selfie.jpg"))[:3]
    rows = [(web.url(name), f"photo {i}") for i, name in enumerate(photos)] + [(web.url("status/404"), "gone")]
    corpus = write_corpus(tmp_path / "corpus.parquet", rows)
    cfg = write_config(tmp_path / "nightly.yaml", corpus, shards={"samples_per_shard": 2},
                       attributes={"predictors": ["age_gender", "geometry"]}, output={"contact_sheet": False})
    run_dir = tmp_path / "run"
    first = subprocess.run(facedata_cmd("run", str(cfg), "--output", str(run_dir), "--no-progress"),
                           env=cli_env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    before = file_mtimes(run_dir, *STAGE_FILES)
    assert len([n for n in before if n.endswith(".stats.json")]) == 3 * 2  # shards, faces, captions
    assert "identity/identity.json" in before
    summary_mtime = (run_dir / "summary.json").stat().st_mtime_ns

    server = PrefectServer(tmp_path / "prefect_server", cli_env)
    api = server.api
    serve_log = tmp_path / "serve.log"
    serve_out = serve_log.open("w")
    serve = None
    try:
        server.start()
        serve_env = {**cli_env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        # On the Dask runner, retrying once: only the flow object the runner keeps has that policy.
        overrides = ["runner.kind=dask", "runner.flow_retries=1", "runner.flow_retry_delay_s=1"]
        serve = subprocess.Popen(
            facedata_cmd("serve", str(cfg), "--cron", "0 2 * * *", "--name", "nightly", "--output", str(run_dir),
                      *[arg for item in overrides for arg in ("--set", item)]),
            env=serve_env, stdout=serve_out, stderr=subprocess.STDOUT, start_new_session=True)

        def deployment():
            r = httpx.get(f"{api}/deployments/name/curate/nightly", timeout=5)
            return r.json() if r.status_code == 200 else None  # 404 until serve has registered it

        dep = wait_for(deployment, 60, "the served deployment", serve)
        [schedule] = dep["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] and not dep["paused"]
        assert dep["parameters"]["run_dir"] == str(run_dir)
        assert dep["parameters"]["config"] == load_config(cfg, overrides).model_dump(mode="json")
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

        # What the schedule would start at 02:00, now.
        run = server.request("POST", f"/deployments/{dep['id']}/create_flow_run", json={})

        def finished():
            state = server.request("GET", f"/flow_runs/{run['id']}")["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, 120, "the served flow run", serve)
        assert state["type"] == "COMPLETED", (state, serve_log.read_text()[-3000:])
        flow_run = server.request("GET", f"/flow_runs/{run['id']}")
        assert flow_run["empirical_policy"]["retries"] == 1 and flow_run["parameters"]["run_dir"] == str(run_dir)
        # The stages' own log lines reach the run's logs on the server (shipped in batches), from the
        # Dask workers too: every stage of the 2 shards, and the identity stage, was skipped.
        def skipped():
            logs = server.request("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                                "limit": 200})
            lines = [entry["message"] for entry in logs if "already done, skipped" in entry["message"]]
            return lines if len(lines) >= 3 * 2 + 1 else None

        assert len(wait_for(skipped, 20, "the skipped-stage log lines")) == 3 * 2 + 1
        # Let the run's process close its Dask cluster (~2 s) before stopping: interrupted, that takes ~11 s.
        wait_for(lambda: not _flow_run_processes(serve.pid), 30, "the flow run's process to exit")
    finally:
        if serve is not None:
            stop_process_group(serve)
        server.stop()
        serve_out.close()

    after = file_mtimes(run_dir, *STAGE_FILES)
    assert after == before, "an unchanged input should leave every stage's files untouched"
    assert (run_dir / "summary.json").stat().st_mtime_ns > summary_mtime, "the served run should report"
    check_run_consistent(run_dir, len(rows))

    # A planned input file rewritten (here with one more row) no longer matches the run's plan:
    # refused, not mixed in. (An input folder that grows by new files is planned on: test_flow.)
    write_corpus(corpus, rows + [(web.url("coffee.png"), "coffee")])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    with pytest.raises(InputError, match=f"planned input file {corpus} changed"):
        plan_shards(load_config(cfg).input, saved["shards"]["samples_per_shard"], run_dir / "_plan")
