"""The fault accounting (tests/support/ledger.py) counts what a user would miss, and only that."""

from __future__ import annotations

from tests.support.ledger import Ledger


def reply(cmid, msg_id, seq, session="s", ok=True):
    if not ok:
        return {"type": "message_reply", "ok": False, "clientMsgId": cmid, "error": {"code": "not_member"}}
    return {"type": "message_reply", "ok": True, "clientMsgId": cmid, "msgId": msg_id, "sessionId": session,
            "seq": seq}


def send(msg_id, seq, frm="a", session="s", body="x"):
    return {"type": "message_send", "msgId": msg_id, "sessionId": session, "seq": seq, "from": frm, "body": body}


def ledger():
    led = Ledger()
    led.member("s", ["a", "b"])
    for label, user in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        led.connection(label, user)
    return led


def test_every_connection_but_the_sender_must_get_it_once():
    """A message missing on the sender's other device, or on a recipient, is lost; copies are only counted."""
    led = ledger()
    for n in (1, 2, 3):
        led.asking("a1", f"c{n}", 0.0)
        led.replied("a1", "a", reply(f"c{n}", f"m{n}", n), 1.0)
    for n in (1, 2, 3):
        led.received("b1", "b", send(f"m{n}", n), 1.5)
    led.received("b1", "b", send("m2", 2), 9.0)  # a duplicate
    led.received("a2", "a", send("m1", 1), 1.2)
    led.received("a2", "a", send("m3", 3), 1.2)
    r = led.report()
    assert (r.messages, r.pairs, r.delivered, r.lost, r.duplicated) == (3, 6, 5, 1, 1)
    assert r.lost_examples == [("a2", "m2")]
    assert r.seq_gaps == 1 and r.server_seq_gaps == 0
    assert r.mismatched == 0 and r.worst_delay_s == 0.5


def test_delay_counts_from_the_heal_and_healed_pairs_are_counted():
    """Stuck deliveries are measured from when the dependency answered again."""
    led = ledger()
    led.asking("a1", "c1", 0.0)
    led.replied("a1", "a", reply("c1", "m1", 1), 1.0)
    led.asking("a1", "c2", 20.0)
    led.replied("a1", "a", reply("c2", "m2", 2), 20.0)
    led.received("b1", "b", send("m1", 1), 15.0)
    led.received("a2", "a", send("m1", 1), 25.0)
    led.received("b1", "b", send("m2", 2), 20.1)
    led.received("a2", "a", send("m2", 2), 20.1)
    r = led.report(healed_at=10.0)
    assert r.healed == 2 and r.stuck == 2
    assert r.worst_delay_s == 15.0 and r.late == 1  # m1 at a2: 15 s after the heal
    assert r.last_stuck_after_heal_s == 15.0
    assert r.after_heal == 1 and r.first_ok_after_heal_s == 10.0


def test_a_copy_that_differs_and_a_hole_in_a_session_are_reported():
    """Two different messages under one msgId, or a seq nobody ever saw, are bugs."""
    led = ledger()
    for n, seq in ((1, 1), (3, 3)):
        led.asking("a1", f"c{n}", 0.0)
        led.replied("a1", "a", reply(f"c{n}", f"m{n}", seq), 0.0)
    led.received("b1", "b", send("m1", 1), 0.1)
    led.received("b1", "b", send("m1", 1, body="other"), 0.2)
    led.received("b1", "b", send("m3", 3), 0.1)
    r = led.report()
    assert r.mismatched == 1
    assert r.server_seq_gaps == 1  # seq 2: stored (it has a seq) but seen by nobody


def test_failed_and_unanswered_sends_are_not_owed_to_anyone():
    """Only messages with an ok reply must arrive; others are counted apart."""
    led = ledger()
    led.asking("a1", "c1", 0.0)
    led.asking("a1", "c2", 0.0)
    led.retried("unavailable")
    led.replied("a1", "a", reply("c1", None, None, ok=False), 0.1)
    led.replied("b1", "b", reply("zz", "m9", 9), 0.1)  # not asked through this ledger
    r = led.report()
    assert (r.messages, r.pairs, r.lost) == (0, 0, 0)
    assert r.failed == {"not_member": 1} and r.retries == {"unavailable": 1} and r.unanswered == 1
