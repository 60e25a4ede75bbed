"""/api/status's `fine_tuning`: finetune_db.status_rows (two reads over real SQLite) shaped by
status.fine_tuning_view. The caller's own jobs only (active, then the newest finished),
who trains each and until when, progress from the latest metrics event, the outcome; every
key's active jobs only counted, the training nodes only named by number."""

from __future__ import annotations

import json
import math

import pytest

import finetune_db
import status
from config import load_config
from health import HealthView
from tests.support.ftkit import BASE, FtGateway
from tests.support.plans import recorded, table_scans
from tests.support.stores import drive
from tests.unit.conftest import fleet_env

ME, OTHER = "a" * 16, "b" * 16
ALLOWED_SCANS = ("SCAN CONSTANT ROW", "SCAN (subquery")  # the bounded branches


def view(g: FtGateway, owner: str = ME) -> dict:
    out = status.fine_tuning_view(*drive(finetune_db.status_rows(g.db, owner, g.now)), g.now)
    json.dumps(out, allow_nan=False)  # what the shell sends: strict JSON
    return out


def new_job(g: FtGateway, owner: str = ME, **extra) -> str:
    body = {"model": BASE, "training_file": g.training_file(owner), **extra}
    r = g.create_job(owner, body)
    assert r.status == 200, r.body
    return r.body["id"]


def metrics(step: int, total: int, loss: float, **more) -> dict:
    data = {"step": step, "total_steps": total, "train_loss": loss, **more}
    return {"type": "metrics", "message": f"Step {step}/{total}", "data": data}


def test_empty() -> None:
    assert view(FtGateway()) == {"active": 0, "nodes": [], "mine": []}


def test_a_job_from_created_to_succeeded_with_its_holder_and_progress() -> None:
    g = FtGateway()
    mine = new_job(g, suffix="heady", hyperparameters={"n_epochs": 3})
    g.now += 1
    theirs = new_job(g, OTHER)  # counted, never shown to ME
    out = view(g)
    assert (out["active"], out["nodes"]) == (2, [])
    (j,) = out["mine"]
    assert j == {
        "id": mine,
        "status": "validating_files",
        "model": BASE,
        "suffix": "heady",
        "fine_tuned_model": None,
        "created_at": int(g.now - 1),
        "finished_at": None,
        "holder": None,
        "progress": None,
        "checkpoints": 0,
        "trained_tokens": None,
        "error": None,
    }
    assert [x["id"] for x in view(g, OTHER)["mine"]] == [theirs]

    lease = g.train_lease(7)  # the oldest job: mine
    assert lease["job_id"] == mine
    (j,) = view(g)["mine"]
    assert j["status"] == "validating_files"  # a node holds it, the files not yet accepted
    assert j["holder"] == {"node": 7, "expires_at": int(lease["expires_at"]), "attempt": 1}
    assert view(g)["nodes"] == [7]

    g.send_events(lease, [{"message": "Files validated"}], validated=True)
    g.send_events(lease, [metrics(1, 12, 2.5), metrics(5, 12, 1.25, valid_loss=1.5)])
    g.send_events(lease, [{"message": "a message after the metrics"}])
    (j,) = view(g)["mine"]
    assert j["status"] == "running" and j["holder"]["node"] == 7
    # 12 steps over 3 epochs: step 5 is in epoch 2; the message after it changes nothing.
    assert j["progress"] == {
        "step": 5,
        "total_steps": 12,
        "train_loss": 1.25,
        "valid_loss": 1.5,
        "full_valid_loss": None,
        "n_epochs": 3,
        "epoch": 2,
    }
    assert g.put_checkpoint(lease, 4, b"ckpt", {"train_loss": 1.3}).status == 200

    # The node dies: its lease lapses, the job waits for a node (queued), nobody holds it.
    g.now += g.ft.lease_s + 1
    out = view(g)
    (j,) = out["mine"]
    assert (j["status"], j["holder"], out["nodes"]) == ("queued", None, [])
    assert j["progress"]["step"] == 5 and j["checkpoints"] == 1  # what was reached stays

    again = g.train_lease(8)
    assert again["job_id"] == mine
    (j,) = view(g)["mine"]
    assert j["status"] == "running" and j["holder"]["node"] == 8 and j["holder"]["attempt"] == 2
    g.send_events(again, [metrics(12, 12, 0.5)])
    assert g.put_checkpoint(again, 8, b"c2").status == 200
    assert g.put_checkpoint(again, 12, b"c3").status == 200
    assert g.put_adapter(again, b"adapter").startswith("ft/")
    hp = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    done = {"ok": True, "trained_tokens": 900, "hyperparameters": hp}
    assert g.commit_train(again, done).status == 200
    out = view(g)
    (j,) = out["mine"]
    assert j["status"] == "succeeded" and j["holder"] is None
    assert j["fine_tuned_model"] == g.job(ME, mine)["fine_tuned_model"]
    assert j["finished_at"] == int(g.now) and j["trained_tokens"] == 900
    assert j["checkpoints"] == 3 and j["progress"]["epoch"] == 3
    assert j["progress"]["train_loss"] == 0.5 and j["error"] is None
    assert (out["active"], out["nodes"]) == (1, [])  # OTHER's job, still waiting


def test_a_failed_job_shows_its_error_code_and_a_bounded_message() -> None:
    g = FtGateway()
    job = new_job(g)
    lease = g.train_lease(7)
    err = {"code": "invalid_training_file", "message": "line 3: " + "x" * 999, "param": None}
    assert g.commit_train(lease, {"ok": False, "error": err}).status == 200
    (j,) = view(g)["mine"]
    assert (j["id"], j["status"], j["error"]["code"]) == (job, "failed", "invalid_training_file")
    assert j["error"]["message"] == err["message"][: status.ERROR_CHARS]
    assert j["progress"] is None and j["holder"] is None


def test_at_most_twenty_active_then_ten_finished_newest_first() -> None:
    g = FtGateway()
    fid = g.training_file(ME)
    ids = []
    for _ in range(34):
        g.now += 1
        r = g.create_job(ME, {"model": BASE, "training_file": fid})
        ids.append(r.body["id"])
    finished = ids[:12]  # the oldest 12 are cancelled: final
    for i in finished:
        assert g.cancel_job(ME, i).status == 200
    out = view(g)
    active = ids[12:][::-1][: finetune_db.STATUS_ACTIVE]
    newest_done = finished[::-1][: finetune_db.STATUS_FINISHED]
    assert [j["id"] for j in out["mine"]] == active + newest_done
    assert {j["status"] for j in out["mine"][20:]} == {"cancelled"}
    assert out["active"] == 22  # the count is not bounded by what is listed
    assert view(g, OTHER)["mine"] == []


def test_two_statements_each_on_an_index() -> None:
    g = FtGateway()
    new_job(g)
    lease = g.train_lease(7)
    g.send_events(lease, [metrics(1, 2, 1.0)], validated=True)
    with recorded(g.db) as seen:
        view(g)
    assert len(seen) == 2
    assert not table_scans(g.db, seen, ALLOWED_SCANS)


# ---- the shaping alone: a node's metrics data is untrusted ------------------------------------


def row(**over) -> dict:
    base = {
        "id": "ftjob-1",
        "model": BASE,
        "suffix": None,
        "fine_tuned_model": None,
        "status": "running",
        "hyperparameters": json.dumps({"n_epochs": 2}),
        "created_at": 100,
        "finished_at": None,
        "trained_tokens": None,
        "error": None,
        "work_state": "leased",
        "work_node": 7,
        "work_expires_at": 200.0,
        "work_attempts": 1,
        "last_metrics": None,
        "checkpoints": 0,
    }
    return {**base, **over}


def shaped(**over) -> dict:
    return status.fine_tuning_view([row(**over)], {"active": 1, "nodes": "7"}, 150.0)["mine"][0]


def progress(step, total, epoch, train=None, valid=None, full=None, n_epochs=2) -> dict:
    return {
        "step": step,
        "total_steps": total,
        "train_loss": train,
        "valid_loss": valid,
        "full_valid_loss": full,
        "n_epochs": n_epochs,
        "epoch": epoch,
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, None),
        ("not json", None),
        ({"train_loss": 1.0}, None),  # no step
        ({"step": True}, None),
        ({"step": -1}, None),
        (
            {"step": 3, "total_steps": 4, "train_loss": math.nan, "valid_loss": "x"},
            progress(3, 4, 2),
        ),
        (
            {"step": 2, "total_steps": 4, "train_loss": 1, "full_valid_loss": math.inf},
            progress(2, 4, 1, 1),
        ),
        ({"step": 9, "total_steps": 4, "epoch": 5}, progress(9, 4, 5)),  # the node's own epoch wins
        ({"step": 9, "total_steps": 4}, progress(9, 4, 2)),  # past the end: the last epoch
        ({"step": 1, "total_steps": "4"}, progress(1, None, None)),
    ],
)
def test_progress_from_a_nodes_metrics(data, expected) -> None:
    text = data if isinstance(data, str) or data is None else json.dumps(data)
    assert shaped(last_metrics=text)["progress"] == expected
    json.dumps(shaped(last_metrics=text), allow_nan=False)


def test_no_epoch_while_the_epochs_are_auto_or_the_row_is_malformed() -> None:
    data = json.dumps({"step": 1, "total_steps": 4})
    hp = json.dumps({"n_epochs": "auto"})
    assert shaped(last_metrics=data, hyperparameters=hp)["progress"]["epoch"] is None
    assert shaped(last_metrics=data, hyperparameters="{bad")["progress"]["n_epochs"] is None
    assert shaped(error="{bad")["error"] is None
    assert shaped(error=json.dumps({"message": "m"}))["error"] == {"code": "error", "message": "m"}


def test_a_lapsed_lease_is_no_holder_and_the_node_list_is_numbers_only() -> None:
    assert shaped(work_expires_at=149.0)["holder"] is None
    assert shaped(work_expires_at=149.0)["status"] == "queued"
    assert shaped(work_state="done", status="succeeded")["holder"] is None
    out = status.fine_tuning_view([], {"active": 3, "nodes": "8,7,8"}, 0.0)
    assert out == {"active": 3, "nodes": [7, 8], "mine": []}


def test_the_status_body_carries_the_view() -> None:
    v = {"active": 0, "nodes": [], "mine": []}
    out = status.status_body(load_config(fleet_env()), HealthView(), 0.0, "r", "1", None, v)
    assert out["fine_tuning"] == v
    assert (
        status.status_body(load_config(fleet_env()), HealthView(), 0.0, "r", "1")["fine_tuning"]
        is None
    )
