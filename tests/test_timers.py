from waportd.timers import Timers


def test_due_entries_come_out_earliest_first_and_equal_ones_in_order():
    t = Timers()
    t.at(5.0, "b", "x")
    t.at(1.0, "a", "y")
    t.at(5.0, "c", "z")
    t.at(9.0, "d", "w")
    assert t.next_deadline() == 1.0
    assert t.due(0.5) == []
    assert t.due(5.0) == [(1.0, "a", "y"), (5.0, "b", "x"), (5.0, "c", "z")]
    assert t.next_deadline() == 9.0


def test_pushed_back_entries_fire_later_unchanged():
    t = Timers()
    for i in range(3):
        t.at(1.0, f"c{i}", i)
    taken = t.due(2.0)
    t.push_back(taken[1:])
    assert t.due(2.0) == taken[1:]
    assert t.next_deadline() is None
