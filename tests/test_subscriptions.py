from waportd.subscriptions import Subscriptions


def test_nobody_listening_wants_nothing():
    assert not Subscriptions().wants(b"acme.sent")


def test_a_prefix_subscription_wants_its_topics_only():
    subs = Subscriptions()
    subs.feed(b"\x01acme.")
    assert subs.wants(b"acme.sent") and subs.wants(b"acme.state")
    assert not subs.wants(b"zeta.sent")


def test_a_catch_all_subscription_wants_everything_until_it_leaves():
    subs = Subscriptions()
    subs.feed(b"\x01")
    assert subs.wants(b"zeta.receipt")
    subs.feed(b"\x00")
    assert not subs.wants(b"zeta.receipt")


def test_leaving_one_prefix_keeps_the_others():
    subs = Subscriptions()
    for frame in (b"\x01acme.", b"\x01zeta.sent", b"\x00acme."):
        subs.feed(frame)
    assert not subs.wants(b"acme.sent")
    assert subs.wants(b"zeta.sent")


def test_frames_that_are_neither_subscribe_nor_leave_change_nothing():
    subs = Subscriptions()
    subs.feed(b"\x01acme.")
    for junk in (b"", b"\x02acme.", b"\x02"):
        subs.feed(junk)
    assert subs.prefixes == {b"acme."}
