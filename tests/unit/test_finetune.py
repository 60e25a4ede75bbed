"""The fine-tuning core (finetune.py, finetune_nodes.py, finetune_db.py) on the real SQL and a
dict R2: every body the SDK reads parsed by the openai SDK's own types; create's validation;
pagination; ownership; cancel; the node's lease / files / heartbeat / events / checkpoints /
adapter / commit; resume after a node's death; serving (models, routing, adapters)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from openai.types import FileObject, Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

import files
import finetune
import finetune_nodes
from finetune import FtSettings
from heady_shared import ftlines
from tests.support.batchkit import MODEL, jsonl
from tests.support.ftkit import BASE, FtGateway, chat_lines
from tests.support.plans import recorded, table_scans
from tests.support.stores import drive

ME, OTHER = "a" * 16, "b" * 16
HP = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2.0}


def new_job(g: FtGateway, owner: str = ME, **extra) -> dict:
    body = {"model": BASE, "training_file": g.training_file(owner), **extra}
    r = g.create_job(owner, body)
    assert r.status == 200, r.body
    return r.body


def train_to_success(g: FtGateway, lease: dict, tokens: int = 1234):
    assert g.put_adapter(lease, b"adapter-tar").startswith("ft/")
    return g.commit_train(lease, {"ok": True, "trained_tokens": tokens, "hyperparameters": HP})


# ----------------------------------------------------------------------------- shapes


def test_every_client_body_parses_as_the_sdk_types() -> None:
    g = FtGateway()
    job = new_job(g, suffix="heady", metadata={"team": "a"})
    FineTuningJob.model_validate(job)
    assert job["status"] == "validating_files" and job["fine_tuned_model"] is None
    assert job["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
                "n_epochs": "auto",
            }
        },
    }
    lease = g.train_lease(7)
    g.send_events(lease, [{"message": "Files validated"}], validated=True)
    g.send_events(
        lease,
        [{"type": "metrics", "message": "Step 1/4: training loss=2.5", "data": {"step": 1}}],
    )
    assert (
        g.put_checkpoint(lease, 2, b"ckpt", {"train_loss": 1.25, "valid_loss": 1.5}).status == 200
    )
    assert train_to_success(g, lease).status == 200
    done = g.job(ME, job["id"])
    parsed = FineTuningJob.model_validate(done)
    assert parsed.status == "succeeded" and parsed.trained_tokens == 1234
    assert parsed.fine_tuned_model == f"ft:{BASE}:heady:heady:{job['id'][len('ftjob-') :]}"
    assert (
        parsed.hyperparameters.n_epochs == 3
        and parsed.method.supervised.hyperparameters.batch_size == 4
    )
    listing = g.jobs(ME).body
    assert set(listing) == {"object", "data", "has_more"}
    [FineTuningJob.model_validate(j) for j in listing["data"]]
    events = g.events(ME, job["id"]).body
    assert set(events) == {"object", "data", "has_more"}
    parsed_events = [FineTuningJobEvent.model_validate(e) for e in events["data"]]
    metrics = [e for e in parsed_events if e.type == "metrics"]
    assert metrics and metrics[0].data == {"step": 1}
    ckpts = g.checkpoints(ME, job["id"]).body
    assert set(ckpts) == {"object", "data", "first_id", "last_id", "has_more"}
    c = FineTuningJobCheckpoint.model_validate(ckpts["data"][0])
    assert c.step_number == 2 and c.metrics.train_loss == 1.25 and c.metrics.step == 2
    assert c.fine_tuned_model_checkpoint == f"{parsed.fine_tuned_model}:ckpt-step-2"
    models = drive(finetune.models_for_owner(g.db, ME))
    assert [Model.model_validate(m).id for m in models] == [parsed.fine_tuned_model]
    [results] = parsed.result_files
    meta = drive(files.get_file(g.db, ME, results, g.now)).body
    assert FileObject.model_validate(meta).purpose == "fine-tune-results"
    csv = g.content(ME, results).decode()
    assert csv == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,,,,\n"
    assert drive(files.get_file(g.db, OTHER, results, g.now)).status == 404


# ---------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"model": None}, "model", "missing_required_parameter"),
        ({"model": "ft:a:heady::1"}, "model", "model_not_available"),
        ({"training_file": None}, "training_file", "missing_required_parameter"),
        ({"training_file": "file-nope"}, "training_file", "file_not_found"),
        ({"training_file": "f" * 129}, "training_file", "missing_required_parameter"),
        ({"validation_file": "f" * 129}, "validation_file", "invalid_value"),
        ({"validation_file": 3}, "validation_file", "invalid_value"),
        ({"validation_file": "file-nope"}, "validation_file", "file_not_found"),
        ({"method": {"type": "dpo"}}, "method.type", "unsupported_value"),
        ({"method": "supervised"}, "method", "invalid_value"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "invalid_value"),
        ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs", "invalid_value"),
        ({"hyperparameters": {"n_epochs": 2.0}}, "hyperparameters.n_epochs", "invalid_value"),
        ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size", "invalid_value"),
        ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size", "invalid_value"),
        (
            {"hyperparameters": {"learning_rate_multiplier": 0}},
            "hyperparameters.learning_rate_multiplier",
            "invalid_value",
        ),
        ({"hyperparameters": {"epochs": 2}}, "hyperparameters.epochs", "invalid_value"),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
            "invalid_value",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
            "method.supervised.hyperparameters.n_epochs",
            "invalid_value",
        ),
        ({"suffix": "Heady"}, "suffix", "invalid_value"),
        ({"suffix": "x" * 65}, "suffix", "invalid_value"),
        ({"suffix": "a:b"}, "suffix", "invalid_value"),
        ({"seed": -1}, "seed", "invalid_value"),
        ({"seed": 2**31}, "seed", "invalid_value"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_value"),
        ({"integrations": [{"type": "wandb"}]}, "integrations", "unsupported_value"),
    ],
)
def test_create_refuses_bad_bodies_naming_the_param(change, param, code) -> None:
    g = FtGateway()
    body = {"model": BASE, "training_file": g.training_file(ME), **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = g.create_job(ME, body)
    assert r.status == 400, r.body
    assert (r.body["error"]["param"], r.body["error"]["code"]) == (param, code)
    assert g.db.rows("SELECT count(*) AS n FROM ft_jobs") == [{"n": 0}]
    assert "request_id" in json.loads(r.render("req-1"))["error"]
    if code != "file_not_found":  # the shape: the CLI's and node's rule set, word for word
        with pytest.raises(ftlines.HyperparameterError) as info:
            ftlines.check_job_request(body)
        said = (info.value.param, info.value.code, str(info.value))
        assert said == (param, code, r.body["error"]["message"])


def test_create_checks_the_files_owner_purpose_and_life() -> None:
    g = FtGateway()
    theirs = g.training_file(OTHER)
    batch_file = g.upload(ME, jsonl(2)).body["id"]
    gone = g.training_file(ME)
    assert drive(files.delete_file(g.db, g.blobs, ME, gone, g.now)).status == 200
    for file_id, code in ((theirs, "file_not_found"), (batch_file, "invalid_file_purpose")):
        for param in ("training_file", "validation_file"):
            body = {"model": BASE, "training_file": g.training_file(ME), param: file_id}
            r = g.create_job(ME, body)
            assert (r.status, r.body["error"]["code"], r.body["error"]["param"]) == (
                400,
                code,
                param,
            )
    r = g.create_job(ME, {"model": BASE, "training_file": gone})
    assert r.body["error"]["code"] == "file_not_found"
    assert g.create_job(ME, b"{nope").body["error"]["code"] == "invalid_json"
    assert g.create_job(ME, b"[]").status == 400


def test_create_accepts_openai_bodies_and_picks_a_seed() -> None:
    g = FtGateway()
    a = new_job(g, hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5})
    assert a["hyperparameters"] == {
        "batch_size": "auto",
        "learning_rate_multiplier": 0.5,
        "n_epochs": 2,
    }
    b = new_job(g, seed=0, suffix="my_model-2", validation_file=g.training_file(ME))
    assert b["seed"] == 0 and b["user_provided_suffix"] == "my_model-2" and b["validation_file"]
    assert 0 <= a["seed"] <= 2**31 - 1
    only = ["Qwen/Qwen3-8B"]
    r = g.create_job(ME, {"model": BASE, "training_file": g.training_file(ME)}, trainable=only)
    assert (r.status, r.body["error"]["code"]) == (400, "model_not_available")


# -------------------------------------------------------------------- list, ownership


def test_list_pages_newest_first_with_has_more_and_metadata_filter() -> None:
    g = FtGateway()
    made = []
    for i in range(5):
        made.append(new_job(g, metadata={"n": str(i % 2)})["id"])
        g.now += 1
    seen, after = [], None
    while True:
        page = g.jobs(ME, after=after, limit="2").body
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == made[::-1]
    odd = g.jobs(ME, metadata={"n": "1"}).body["data"]
    assert [j["id"] for j in odd] == [made[3], made[1]]
    assert g.jobs(OTHER).body["data"] == []
    assert g.jobs(OTHER, after=made[0]).status == 400
    assert g.jobs(ME, limit="0").status == 400 and g.jobs(ME, limit="101").status == 400


def test_another_key_sees_no_job() -> None:
    g = FtGateway()
    job = new_job(g)
    for result in (
        drive(finetune.get_job(g.db, OTHER, job["id"], g.now, g.ft)),
        g.cancel_job(OTHER, job["id"]),
        g.events(OTHER, job["id"]),
        g.checkpoints(OTHER, job["id"]),
    ):
        assert (result.status, result.body["error"]["code"]) == (404, "fine_tune_not_found")
    assert g.job(ME, job["id"])["status"] == "validating_files"


# --------------------------------------------------------------------------- leasing


def test_train_work_goes_only_to_nodes_that_ask_may_and_serve_the_base() -> None:
    g = FtGateway()
    new_job(g)
    assert g.lease(7) is None  # the batch worker's request (no kinds) never gets train work
    assert g.train_lease(7, may_train=False) is None
    assert g.train_lease(7, models=["other/model"]) is None
    body = json.dumps({"models": [BASE], "kinds": ["shards"]}).encode()
    r = drive(
        finetune_nodes.lease_for_node(g.db, g.ids, 7, True, True, body, g.now, g.settings, g.ft)
    )
    assert (r.status, r.body["error"]["param"]) == (400, "kinds")
    lease = g.train_lease(8)
    assert lease["kind"] == "train" and lease["id"].startswith("ftlease-")
    assert finetune_nodes.is_train_lease(lease["id"]) and not finetune_nodes.is_train_lease(
        "lease_1"
    )
    assert g.train_lease(7) is None  # one holder at a time


def test_a_node_asking_for_both_gets_train_first_then_batch_work() -> None:
    g = FtGateway()
    b = g.create_batch(ME, g.upload(ME, jsonl(3)).body["id"]).body
    new_job(g)
    body = json.dumps({"models": [BASE, MODEL], "kinds": ["train", "validate", "lines"]})

    def ask():
        r = drive(
            finetune_nodes.lease_for_node(
                g.db, g.ids, 7, True, True, body.encode(), g.now, g.settings, g.ft
            )
        )
        return r.body["lease"] if r.status == 200 else None

    first, second = ask(), ask()
    assert first["kind"] == "train"
    assert second["kind"] == "validate" and second["batch_id"] == b["id"]
    assert ask() is None


def test_the_lease_reads_its_files_and_nothing_else() -> None:
    g = FtGateway()
    valid = g.upload(ME, chat_lines(3, "v"), purpose="fine-tune").body["id"]
    new_job(g, validation_file=valid)
    lease = g.train_lease(7)
    assert g.read(lease) == chat_lines(12)
    assert g.read(lease, "validation") == chat_lines(3, "v")
    assert lease["validation_input"] == f"/api/nodes/v1/leases/{lease['id']}/validation"
    assert g.read(lease, "input", token="forged").status == 409
    assert g.read(lease, "other").status == 404
    assert g.read_checkpoint(lease).status == 404
    assert drive(finetune_nodes.lease_file(g.db, "lease_x", "t", "input")).status == 409


def test_a_bad_file_fails_the_job_with_the_nodes_error() -> None:
    g = FtGateway()
    job = new_job(g)
    lease = g.train_lease(7)
    err = {"code": "invalid_training_file", "message": "line 3: no assistant message",
           "param": "training_file"}  # fmt: skip
    assert g.commit_train(lease, {"ok": False, "error": err}).status == 200
    done = g.job(ME, job["id"])
    assert done["status"] == "failed" and done["error"] == err and done["finished_at"]
    FineTuningJob.model_validate(done)
    last = g.events(ME, job["id"], limit="1").body["data"][0]
    assert last["level"] == "error" and "line 3" in last["message"]
    assert g.train_lease(8) is None
    assert g.commit_train(lease, {"ok": False, "error": err}).status == 200  # a retry
    bad = g.commit_train(lease | {"token": "nope"}, {"ok": False, "error": err})
    assert bad.status == 409


def test_status_moves_validating_running_queued_running_succeeded() -> None:
    g = FtGateway()
    job = new_job(g)
    lease = g.train_lease(7)
    assert not lease["validated"] and g.job(ME, job["id"])["status"] == "validating_files"
    g.send_events(lease, [{"type": "metrics", "message": "step 1", "data": {"step": 1}}])
    assert g.job(ME, job["id"])["status"] == "running"
    g.now += g.ft.lease_s + 1  # the node died: nothing written, the job shows queued
    assert g.job(ME, job["id"])["status"] == "queued"
    again = g.train_lease(8)
    assert again["validated"] and again["attempt"] == 2
    assert g.job(ME, job["id"])["status"] == "running"
    assert train_to_success(g, again).status == 200
    assert g.job(ME, job["id"])["status"] == "succeeded"


# ------------------------------------------------------------------------------ events


def test_events_are_bounded_and_refused_whole_on_a_stale_lease() -> None:
    g = FtGateway(FtSettings(max_events=4))  # the node's events, not the job's own
    job = new_job(g)
    lease = g.train_lease(7)
    before = len(g.all_events(ME, job["id"]))
    for events, param in (
        ([], "events"),
        ([{"message": "x"}] * 101, "events"),
        ([{"message": ""}], "events"),
        ([{"message": "x" * 2001}], "events"),
        ([{"message": "x", "level": "debug"}], "events"),
        ([{"message": "x", "type": "log"}], "events"),
        ([{"message": "x", "data": "y" * 5000}], "events"),
    ):
        r = g.send_events(lease, events)
        assert (r.status, r.body["error"]["param"]) == (400, param)
    assert g.send_events(lease, [{"message": "x"}], validated="yes").status == 400
    stale = g.send_events(lease | {"token": "forged"}, [{"message": "lost"}])
    assert stale.status == 409
    ok = g.send_events(lease, [{"message": f"m{i}"} for i in range(3)])
    assert ok.body == {"accepted": 3}
    over = g.send_events(lease, [{"message": "one too many"}] * 2)
    assert over.body == {"accepted": 0}
    assert g.send_events(lease, [{"message": "m3"}]).body == {"accepted": 1}
    assert g.send_events(lease, [{"message": "m4"}]).body == {"accepted": 0}
    messages = [e["message"] for e in g.all_events(ME, job["id"])]
    assert messages[before:] == ["m0", "m1", "m2", "m3"]
    page = g.events(ME, job["id"], limit="2").body
    nxt = g.events(ME, job["id"], after=page["data"][-1]["id"], limit="3").body
    newest = [e["message"] for e in page["data"] + nxt["data"]]
    assert newest == ["m3", "m2", "m1", "m0", messages[before - 1]]
    assert g.events(ME, job["id"], after="ftevent-nope").status == 400


# ------------------------------------------------------------------------- checkpoints


def test_checkpoint_uploads_are_checked_replaced_and_refused_when_stale() -> None:
    g = FtGateway(FtSettings(max_blob_bytes=100))
    job = new_job(g)
    lease = g.train_lease(7)
    for step, length, status in (("x", "4", 400), ("-1", "4", 400), ("3", None, 411),
                                 ("3", "101", 413), ("3", "4z", 400)):  # fmt: skip
        target = drive(
            finetune_nodes.checkpoint_target(g.db, lease["id"], lease["token"], step, length, g.ft)
        )
        assert target.status == status, (step, length)
    r = drive(
        finetune_nodes.record_checkpoint(
            g.db, g.blobs, g.ids, lease["id"], lease["token"], "3", None, g.now
        )
    )
    assert r.status == 400  # nothing uploaded
    first = g.put_checkpoint(lease, 3, b"one", {"train_loss": 2.0, "bogus": "x", "valid_loss": "y"})
    assert first.status == 200
    again = g.put_checkpoint(lease, 3, b"two!", {"train_loss": 1.0})
    assert again.status == 200 and again.body["id"] == first.body["id"]
    [c] = g.checkpoints(ME, job["id"]).body["data"]
    assert c["metrics"] == {"train_loss": 1.0, "step": 3}
    assert [k for k in g.blobs.objects if "/ckpt/" in k] == [
        f"ft/{job['id']}/ckpt/3/{lease['id']}.tar"
    ]
    g.now += g.ft.lease_s + 1
    taker = g.train_lease(8)
    assert taker["resume_from"]["step_number"] == 3
    assert g.read_checkpoint(taker) == b"two!"
    stale = g.put_checkpoint(lease, 9, b"late")
    assert stale.status == 409
    assert not any("/ckpt/9/" in k for k in g.blobs.objects)
    for step in (6, 12, 9):
        assert g.put_checkpoint(taker, step, b"s%d" % step).status == 200
    page = g.checkpoints(ME, job["id"], limit="2").body
    assert [c["step_number"] for c in page["data"]] == [12, 9] and page["has_more"]
    rest = g.checkpoints(ME, job["id"], after=page["last_id"]).body
    assert [c["step_number"] for c in rest["data"]] == [6, 3] and not rest["has_more"]


def test_a_partner_resumes_from_the_latest_checkpoint_after_a_death() -> None:
    g = FtGateway()
    job = new_job(g)
    first = g.train_lease(7)
    assert first["resume_from"] is None and first["checkpoint"] is None
    g.put_checkpoint(first, 10, b"epoch1")
    g.put_checkpoint(first, 20, b"epoch2")
    assert g.train_lease(8) is None  # still live
    g.now += g.ft.lease_s + 1
    partner = g.train_lease(8)
    assert partner["resume_from"]["step_number"] == 20
    assert partner["checkpoint"] == f"/api/nodes/v1/leases/{partner['id']}/checkpoint"
    assert g.read_checkpoint(partner) == b"epoch2"
    assert g.beat(first).status == 409
    assert g.put_adapter(first, b"stale").status == 409
    assert g.commit_train(first, {"ok": True, "trained_tokens": 1}).status == 409
    assert train_to_success(g, partner).status == 200
    messages = [e["message"] for e in g.all_events(ME, job["id"])]
    assert "Resuming from the checkpoint at step 20 on another node" in messages
    assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1


def test_a_job_whose_nodes_keep_dying_fails_after_max_attempts() -> None:
    g = FtGateway(FtSettings(max_attempts=2))
    job = new_job(g)
    for node in (7, 8):
        assert g.train_lease(node) is not None
        g.now += g.ft.lease_s + 1
    assert g.train_lease(7) is None
    assert drive(finetune.settle_due(g.db, g.now, g.ft)) == 1
    done = g.job(ME, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "training_interrupted"
    assert g.db.rows("SELECT state FROM work WHERE kind = 'train'") == [{"state": "cancelled"}]


# -------------------------------------------------------------------------------- commit


def test_commit_checks_its_body_and_answers_a_retry() -> None:
    g = FtGateway()
    job = new_job(g)
    lease = g.train_lease(7)
    for body in ({}, {"ok": "yes"}, {"ok": True, "trained_tokens": -1},
                 {"ok": True, "trained_tokens": 5, "hyperparameters": {"n_epochs": "auto"}},
                 {"ok": False}, {"ok": False, "error": {"code": "x"}},
                 {"ok": False, "cancelled": True}):  # fmt: skip
        assert g.commit_train(lease, body).status == 400, body
    assert g.commit_train(lease, {"ok": True, "trained_tokens": 5}).status == 400  # no adapter
    ok = train_to_success(g, lease)
    assert ok.body["fine_tuned_model"] == g.job(ME, job["id"])["fine_tuned_model"]
    assert g.commit_train(lease, {"ok": True, "trained_tokens": 5}).body == {"state": "done"}
    assert g.beat(lease).status == 409
    assert g.train_lease(8) is None
    r = drive(
        finetune_nodes.commit(g.db, g.blobs, g.ids, "lease_x", b'{"token":"t","ok":true}', g.now)
    )
    assert r.status == 409


def test_a_cancelled_job_never_succeeds() -> None:
    g = FtGateway()
    job = new_job(g)
    lease = g.train_lease(7)
    assert g.put_adapter(lease, b"adapter").startswith("ft/")
    c = g.cancel_job(ME, job["id"])
    assert c.status == 200 and c.body["status"] == "cancelled" and c.body["finished_at"]
    FineTuningJob.model_validate(c.body)
    assert g.cancel_job(ME, job["id"]).body["status"] == "cancelled"  # again: same answer
    assert g.beat(lease).body["cancel"] is True
    assert g.put_checkpoint(lease, 5, b"late").status == 409
    assert g.put_adapter(lease, b"again").status == 409
    assert g.send_events(lease, [{"message": "Training stopped at step 5"}]).status == 200
    r = g.commit_train(lease, {"ok": True, "trained_tokens": 9})
    assert (r.status, r.body["error"]["code"]) == (409, "job_not_running")
    assert not any("/adapter/" in k or "/results/" in k for k in g.blobs.objects)  # deleted
    assert g.db.rows("SELECT state FROM work WHERE batch_id = ?", [job["id"]]) == [
        {"state": "done"}
    ]
    assert g.job(ME, job["id"])["status"] == "cancelled"
    assert g.db.rows("SELECT count(*) AS n FROM files WHERE purpose = 'fine-tune-results'") == [
        {"n": 0}
    ]
    assert drive(finetune.models_for_owner(g.db, ME)) == []


def test_a_node_stopping_for_a_cancel_commits_cancelled() -> None:
    g = FtGateway()
    job = new_job(g)
    lease = g.train_lease(7)
    assert g.commit_train(lease, {"ok": False, "cancelled": True}).status == 400  # not cancelled
    g.cancel_job(ME, job["id"])
    assert g.beat(lease).body["cancel"] is True
    assert g.commit_train(lease, {"ok": False, "cancelled": True, "steps": 3}).status == 200
    assert g.job(ME, job["id"])["status"] == "cancelled"
    assert g.beat(lease).status == 409


def test_cancel_of_a_waiting_job_drops_its_work_and_of_a_finished_one_is_refused() -> None:
    g = FtGateway()
    waiting = new_job(g)
    assert g.cancel_job(ME, waiting["id"]).body["status"] == "cancelled"
    assert g.db.rows("SELECT state FROM work WHERE batch_id = ?", [waiting["id"]]) == [
        {"state": "cancelled"}
    ]
    assert g.train_lease(7) is None
    finished = new_job(g)
    assert train_to_success(g, g.train_lease(7)).status == 200
    r = g.cancel_job(ME, finished["id"])
    assert (r.status, r.body["error"]["code"]) == (409, "job_not_cancellable")
    # a cancelled job whose node died: the cron drops the lapsed lease
    dying = new_job(g)
    assert g.train_lease(7) is not None
    g.cancel_job(ME, dying["id"])
    g.now += g.ft.lease_s + 1
    assert drive(finetune.settle_due(g.db, g.now, g.ft)) == 1
    assert drive(finetune.settle_due(g.db, g.now, g.ft)) == 0


# ------------------------------------------------------------------------------ serving


def test_a_fine_tuned_model_belongs_to_its_key() -> None:
    g = FtGateway()
    new_job(g, suffix="heady")
    assert train_to_success(g, g.train_lease(7)).status == 200
    [model] = drive(finetune.models_for_owner(g.db, ME))
    name = model["id"]
    route = drive(finetune.route_ft_model(g.db, ME, name))
    assert route == finetune.FtRoute(name, BASE, finetune.ftnames.slug(name))
    for owner, model_name in ((OTHER, name), (ME, name + "x"), (ME, BASE), (ME, "ft:nope")):
        r = drive(finetune.route_ft_model(g.db, owner, model_name))
        assert (r.status, r.body["error"]["code"]) == (404, "model_not_found")
    assert drive(finetune.models_for_owner(g.db, OTHER)) == []
    served = drive(finetune.adapter_for_node(g.db, g.blobs, route.slug))
    assert served.status == 200 and drive(g.blobs.read_parts(served.stream)) == b"adapter-tar"
    assert dict(served.headers)["x-heady-ft-base"] == BASE
    for slug in ("..", "ft-x-" + "0" * 20, "../etc", route.slug + "/x"):
        assert drive(finetune.adapter_for_node(g.db, g.blobs, slug)).status == 404


def checkpoint_tar(config: bytes = b'{"r": 8}', weights: bytes = b"w" * 600) -> bytes:
    """A checkpoint as heady_node's runner uploads it: the adapter files, then state.json."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        files_ = (("adapter_config.json", config), ("adapter_model.safetensors", weights))
        for name, data in (*files_, ("state.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_a_checkpoint_is_served_to_its_key_while_running_and_after_the_job_ends() -> None:
    g = FtGateway()
    job = new_job(g, suffix="heady")
    lease = g.train_lease(7)
    assert g.put_checkpoint(lease, 3, checkpoint_tar()).status == 200
    assert g.put_checkpoint(lease, 6, b"not a tar").status == 200
    names = {c["step_number"]: c["fine_tuned_model_checkpoint"]
             for c in g.checkpoints(ME, job["id"]).body["data"]}  # fmt: skip
    ckpt = names[3]
    # Usable while the job runs, routed like the job's model: its base, its own slug.
    route = drive(finetune.route_ft_model(g.db, ME, ckpt))
    assert route == finetune.FtRoute(ckpt, BASE, finetune.ftnames.slug(ckpt))
    assert route.slug.startswith(f"ft-ckpt-{job['id'].removeprefix('ftjob-')}-3-")
    model = ckpt.removesuffix(":ckpt-step-3")
    not_served = [
        (OTHER, ckpt),  # another key: as if it did not exist
        (ME, f"{model}:ckpt-step-9"),  # not uploaded (yet)
        (ME, f"{model}:ckpt-step-03"),
        (ME, ckpt.replace(":heady:heady:", ":heady:other:")),  # the job's name is exact
        (ME, ckpt.replace(BASE, "other/base")),
        (ME, model),  # the job's model: not before it succeeds
        (ME, f"{model[:-1]}{'0' if model[-1] != '0' else '1'}:ckpt-step-3"),  # no such job
    ]
    for owner, name in not_served:
        r = drive(finetune.route_ft_model(g.db, owner, name))
        assert (r.status, r.body["error"]["code"]) == (404, "model_not_found"), name
    assert drive(finetune.models_for_owner(g.db, ME)) == []  # /v1/models lists no checkpoint

    # The node's resolver gets the adapter files only, cut from the checkpoint tar.
    served = drive(finetune.adapter_for_node(g.db, g.blobs, route.slug))
    assert served.status == 200 and dict(served.headers)["x-heady-ft-base"] == BASE
    body = drive(g.blobs.read_parts(served.stream))
    assert len(body) == served.length == int(dict(served.headers)["content-length"])
    assert tar_members(body) == {"adapter_config.json": b'{"r": 8}',
                                 "adapter_model.safetensors": b"w" * 600}  # fmt: skip
    assert {key for key, _, _ in served.stream} == {f"ft/{job['id']}/ckpt/3/{lease['id']}.tar"}
    broken = drive(finetune.adapter_for_node(g.db, g.blobs, finetune.ftnames.slug(names[6])))
    assert broken.status == 404 and "holds no adapter" in broken.body["error"]["message"]
    forged = route.slug[:-20] + "0" * 20  # the checkpoint's form, not its digest
    for slug in (forged, finetune.ftnames.slug(f"{model}:ckpt-step-9")):
        assert drive(finetune.adapter_for_node(g.db, g.blobs, slug)).status == 404

    # The rule after the job ends: what checkpoints.list lists stays usable (cancelled here;
    # failed and succeeded alike), a late upload after the end is refused and never listed.
    assert g.cancel_job(ME, job["id"]).body["status"] == "cancelled"
    assert g.put_checkpoint(lease, 9, checkpoint_tar()).status == 409
    assert drive(finetune.route_ft_model(g.db, ME, ckpt)) == route
    assert drive(finetune.adapter_for_node(g.db, g.blobs, route.slug)).status == 200
    failing = new_job(g)
    second = g.train_lease(7)
    assert g.put_checkpoint(second, 2, checkpoint_tar()).status == 200
    err = {"code": "x", "message": "out of memory"}
    assert g.commit_train(second, {"ok": False, "error": err}).status == 200
    assert g.job(ME, failing["id"])["status"] == "failed"
    [c] = g.checkpoints(ME, failing["id"]).body["data"]
    r = drive(finetune.route_ft_model(g.db, ME, c["fine_tuned_model_checkpoint"]))
    assert isinstance(r, finetune.FtRoute) and r.base == BASE


def test_every_statement_of_a_lifecycle_uses_an_index() -> None:
    g = FtGateway()
    with recorded(g.db) as seen:
        job = new_job(g, metadata={"k": "v"}, validation_file=g.training_file(ME))
        lease = g.train_lease(7)
        g.read(lease)
        g.beat(lease)
        g.send_events(lease, [{"message": "m", "type": "metrics"}])
        g.put_checkpoint(lease, 1, b"c")
        g.put_checkpoint(lease, 1, b"c2")
        g.read_checkpoint(lease)
        train_to_success(g, lease)
        g.commit_train(lease, {"ok": False, "error": {"code": "x", "message": "y"}})
        g.jobs(ME, after=job["id"], metadata={"k": "v"})
        g.all_events(ME, job["id"])
        g.checkpoints(ME, job["id"], after=g.checkpoints(ME, job["id"]).body["first_id"])
        other = new_job(g)
        g.cancel_job(ME, other["id"])
        drive(finetune.settle_due(g.db, g.now, g.ft))
        name = drive(finetune.models_for_owner(g.db, ME))[0]["id"]
        drive(
            finetune.adapter_for_node(
                g.db, g.blobs, drive(finetune.route_ft_model(g.db, ME, name)).slug
            )
        )
        ckpt = g.checkpoints(ME, job["id"]).body["data"][0]["fine_tuned_model_checkpoint"]
        drive(
            finetune.adapter_for_node(
                g.db, g.blobs, drive(finetune.route_ft_model(g.db, ME, ckpt)).slug
            )
        )
    assert len(seen) >= 25
    assert not table_scans(g.db, seen, ("SCAN json_each", "SCAN CONSTANT ROW"))


def test_a_deleted_training_file_stays_readable_until_its_job_ends() -> None:
    g = FtGateway()
    job = new_job(g)
    fid = job["training_file"]
    assert drive(files.delete_file(g.db, g.blobs, ME, fid, g.now)).status == 200
    drive(files.purge_deleted(g.db, g.blobs, g.now))
    lease = g.train_lease(7)
    assert g.read(lease) == chat_lines(12)
    assert train_to_success(g, lease).status == 200
    assert drive(files.purge_deleted(g.db, g.blobs, g.now)) == 1
    assert not any(k.startswith("u/") for k in g.blobs.objects)


def test_the_results_file_is_the_metrics_per_logged_step() -> None:
    g = FtGateway()
    new_job(g)
    lease = g.train_lease(7)
    steps = [
        {"step": 10, "train_loss": 2.5, "train_mean_token_accuracy": 0.5},
        {"step": 20, "train_loss": 1.25, "valid_loss": 1.5, "valid_mean_token_accuracy": 0.75},
        {"step": "bad"},
    ]
    events = [{"type": "metrics", "message": f"m{i}", "data": d} for i, d in enumerate(steps)]
    assert g.send_events(lease, events).body == {"accepted": 3}
    assert train_to_success(g, lease).status == 200
    [job] = g.jobs(ME).body["data"]
    assert g.content(ME, job["result_files"][0]).decode().splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
        "10,2.5,0.5,,",
        "20,1.25,,1.5,0.75",
    ]


def test_the_training_nodes_bodies_as_heady_node_sends_them() -> None:
    """The request and commit bodies of heady_node's fine-tuning runner (issue 19, node side):
    L's paths under the lease, metrics header, commit with steps/seed, stop for a cancel."""
    g = FtGateway()
    job = new_job(g, validation_file=g.training_file(ME, n=3), seed=7)
    lease = g.train_lease(7)
    base = f"/api/nodes/v1/leases/{lease['id']}/"
    assert lease["input"].startswith(base) and lease["validation_input"].startswith(base)
    assert (lease["job_id"], lease["model"], lease["seed"]) == (job["id"], BASE, 7)
    assert lease["hyperparameters"] == job["hyperparameters"]
    assert (
        g.send_events(
            lease, [{"level": "info", "type": "message", "message": "Validating training file"}]
        ).status
        == 200
    )
    metrics = {"step": 4, "train_loss": 1.5, "train_mean_token_accuracy": 0.25}
    step = {"level": "info", "type": "metrics", "message": "Step 4/8: training loss=1.5000"}
    assert g.send_events(lease, [step | {"data": {**metrics, "total_steps": 8}}]).status == 200
    assert g.put_checkpoint(lease, 4, b"tar", metrics).status == 200
    assert g.put_adapter(lease, b"tar").startswith("ft/")
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0}
    body = {"ok": True, "steps": 8, "trained_tokens": 640, "hyperparameters": hp, "seed": 7}
    assert g.commit_train(lease, body).status == 200
    assert g.job(ME, job["id"])["hyperparameters"] == hp


def test_the_fine_tuning_core_imports_only_the_stdlib_and_src() -> None:
    """The Worker bundles src/ as it is and Pyodide has no wheels for it: stdlib only."""
    import ast
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    local = {p.stem for p in src.glob("*.py")} | {"heady_shared"}
    paths = [*src.glob("finetune*.py"), src / "heady_shared" / "ftnames.py"]
    assert len(paths) == 4
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in local, (path.name, name)
