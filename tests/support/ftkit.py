"""Fine-tuning over the batch test gateway: the client calls and a training node's calls, made
the way the Worker shell makes them (a PUT is target -> store -> record, as the shell streams)."""

from __future__ import annotations

import json

import finetune
import finetune_nodes
from finetune import FtSettings
from tests.support.batchkit import Gateway
from tests.support.stores import drive

BASE = "Qwen/Qwen2.5-1.5B-Instruct"


def chat_lines(n: int, tag: str = "ex") -> bytes:
    """n training examples in OpenAI's chat format."""
    return b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{tag} question {i}"},
                    {"role": "assistant", "content": f"{tag} answer {i}"},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


class FtGateway(Gateway):
    def __init__(self, ft: FtSettings | None = None, **kw) -> None:
        super().__init__(**kw)
        self.ft = ft or FtSettings()

    # --- client side
    def training_file(self, owner: str, n: int = 12, purpose: str = "fine-tune") -> str:
        f = self.upload(owner, chat_lines(n), purpose=purpose)
        assert f.status == 200, f.body
        return f.body["id"]

    def create_job(self, owner: str, body: dict | bytes, trainable=None):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return drive(finetune.create_job(self.db, self.ids, owner, raw, self.now, trainable))

    def job(self, owner: str, job_id: str) -> dict:
        result = drive(finetune.get_job(self.db, owner, job_id, self.now, self.ft))
        assert result.status == 200, result.body
        return result.body

    def jobs(self, owner: str, **query):
        return drive(finetune.list_jobs(self.db, owner, self.now, self.ft, **query))

    def cancel_job(self, owner: str, job_id: str):
        return drive(finetune.cancel_job(self.db, self.ids, owner, job_id, self.now))

    def events(self, owner: str, job_id: str, **query):
        return drive(finetune.list_events(self.db, owner, job_id, **query))

    def all_events(self, owner: str, job_id: str) -> list[dict]:
        """Every event, oldest first, by walking the pages."""
        out, after = [], None
        while True:
            page = self.events(owner, job_id, after=after, limit="7")
            assert page.status == 200, page.body
            out += page.body["data"]
            if not page.body["has_more"]:
                return out[::-1]
            after = page.body["data"][-1]["id"]

    def checkpoints(self, owner: str, job_id: str, **query):
        return drive(finetune.list_checkpoints(self.db, owner, job_id, **query))

    # --- node side
    def train_lease(self, node: int, models=(BASE,), may_train=True):
        body = json.dumps({"models": list(models), "idle": True, "kinds": ["train"]}).encode()
        result = drive(
            finetune_nodes.lease_for_node(
                self.db,
                self.ids,
                node,
                True,
                may_train,
                body,
                self.now,
                self.settings,
                self.ft,
            )
        )
        assert result.status in (200, 204), result.body
        return result.body["lease"] if result.status == 200 else None

    def read(self, lease: dict, which: str = "input", token: str | None = None):
        result = drive(
            finetune_nodes.lease_file(self.db, lease["id"], token or lease["token"], which)
        )
        if result.status != 200:
            return result
        return drive(self.blobs.read_parts(result.stream))

    def read_checkpoint(self, lease: dict):
        result = drive(finetune_nodes.lease_checkpoint(self.db, lease["id"], lease["token"]))
        if result.status != 200:
            return result
        return drive(self.blobs.read_parts(result.stream))

    def beat(self, lease: dict, token: str | None = None):
        body = json.dumps({"token": token or lease["token"]}).encode()
        return drive(finetune_nodes.heartbeat(self.db, lease["id"], body, self.now, self.ft))

    def send_events(self, lease: dict, events: list[dict], **extra):
        body = json.dumps({"token": lease["token"], "events": events, **extra}).encode()
        return drive(
            finetune_nodes.append_events(self.db, self.ids, lease["id"], body, self.now, self.ft)
        )

    def put_checkpoint(self, lease: dict, step: int, data: bytes, metrics: dict | None = None):
        """The shell's PUT .../checkpoints/<step>: target, store, record."""
        token = lease["token"]
        target = drive(
            finetune_nodes.checkpoint_target(
                self.db, lease["id"], token, str(step), str(len(data)), self.ft
            )
        )
        if not isinstance(target, str):
            return target
        drive(self.blobs.put(target, data, length=len(data)))
        header = json.dumps(metrics) if metrics is not None else None
        return drive(
            finetune_nodes.record_checkpoint(
                self.db, self.blobs, self.ids, lease["id"], token, str(step), header, self.now
            )
        )

    def put_adapter(self, lease: dict, data: bytes):
        target = drive(
            finetune_nodes.adapter_target(
                self.db, lease["id"], lease["token"], str(len(data)), self.ft
            )
        )
        if isinstance(target, str):
            drive(self.blobs.put(target, data, length=len(data)))
        return target

    def commit_train(self, lease: dict, body: dict):
        raw = json.dumps({"token": lease["token"], **body}).encode()
        return drive(
            finetune_nodes.commit(self.db, self.blobs, self.ids, lease["id"], raw, self.now)
        )
