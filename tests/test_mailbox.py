"""The learner's mailbox (actors/mailbox.py) keeps a queue's semantics: every rank gets every
command in order, a wait times out to None, a restart's clear drops only the inboxes."""
import threading
import time

import pytest

from treegrpo_ray.actors.mailbox import Mailbox

pytestmark = pytest.mark.ray


def test_every_rank_gets_every_command_in_order_and_replies_wait_in_the_outbox(ray_local):
    mail = Mailbox(2, {})
    for cmd in ("a", "b"):
        mail.to_ranks(cmd)
    mail.answer("ready")
    assert [mail.next(0), mail.next(0), mail.next(1), mail.next(1)] == ["a", "b", "a", "b"]
    assert mail.reply(timeout=1.0) == "ready"
    start = time.monotonic()
    assert mail.reply(timeout=0.3) is None and time.monotonic() - start >= 0.3   # nothing there: None, after the wait


def test_a_waiting_rank_wakes_on_the_next_command_and_clear_drops_only_the_inboxes(ray_local):
    mail = Mailbox(1, {})
    got = []
    waiter = threading.Thread(target=lambda: got.append(mail.next(0)))
    waiter.start()
    time.sleep(0.5)                  # blocked in the actor, not polling
    mail.to_ranks("update")
    waiter.join(timeout=30)
    assert got == ["update"]
    mail.to_ranks("stale")
    mail.answer("reply")
    mail.clear_ranks()               # what the driver does when Ray Train restores the group
    mail.to_ranks("resent")
    assert mail.next(0) == "resent" and mail.reply(timeout=1.0) == "reply"
