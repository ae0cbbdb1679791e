"""pecd.fastpickle: the slotted dataclasses that cross to the format worker processes pickle and
copy to equal objects, frozen as before, by the fast path; what is not a slotted dataclass, and a
pickle that does not match its class, are refused."""

from __future__ import annotations

import copy
import copyreg
import dataclasses
import functools
import pickle
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest

import pecd.runtime.formats  # noqa: F401 (registers the pec/ classes, as in every process)
from pecd.engine.effects import Delivery, TakeInCharge, TakenInCharge
from pecd.engine.vocab import DELIVERED, Outcome, Stored
from pecd.fastpickle import fast_pickle
from pecd.pec import builders
from pecd.pec.builders import BuiltMessage
from pecd.pec.classify import Classification, SignatureReport
from pecd.pec.daticert import Daticert, Destinatario
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import DaticertTipo, DestinatarioTipo, Errore, Kind, TipoRicevuta, Trasporto

WHEN = pec_time(datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC))
DEST = Destinatario("bob@pec.example.it", DestinatarioTipo.ESTERNO)
DATICERT = Daticert(
    tipo=DaticertTipo.AVVENUTA_CONSEGNA,
    mittente="alice@pec.example.it",
    destinatari=(DEST, Destinatario("carol@pec.example.it")),
    risposte="alice@pec.example.it",
    gestore_emittente="Example PEC S.p.A.",
    giorno=WHEN.giorno,
    ora=WHEN.ora,
    zona=WHEN.zona,
    identificativo="opec1.20261124090000.1@pec.example.it",
    errore=Errore.NESSUNO,
    oggetto="Contratto",
    msgid="<m1@client.example>",
    ricevuta=TipoRicevuta.BREVE,
    consegna="bob@pec.example.it",
)
BUILT = BuiltMessage(b"signed\r\n", "m2@pec.example.it", DATICERT, ("alice@pec.example.it",))
DELIVERY = Delivery("bob@pec.example.it", "key:bob", b"envelope bytes", 1 << 20)
TAKEN = TakenInCharge(
    Classification(
        Kind.TRANSPORT_ENVELOPE,
        Trasporto.POSTA_CERTIFICATA,
        None,
        False,
        DATICERT,
        SignatureReport(True, True, "sha256"),
    ),
    (DELIVERED, Outcome(Stored.FAILED, "OSError: disk")),
    BUILT,
    (("bob@pec.example.it", "avvenuta-consegna", BUILT, None),),
    {"carol@pec.example.it": "retry"},
    WHEN,
)
TAKE = TakeInCharge(
    b"envelope bytes",
    (DELIVERY, dataclasses.replace(DELIVERY, mailbox="carol@pec.example.it")),
    functools.partial(builders.presa_in_carico, when=WHEN, ricezione=["bob@pec.example.it"]),
    functools.partial(sorted, key=str),  # any picklable callable: the answer is not called here
)

# Every class given the fast path, with an instance of it.
FAST: list[Any] = [DEST, DATICERT, WHEN, DELIVERED, DELIVERY, TAKEN, TAKE]


def same_call(a: Any, b: Any) -> bool:
    """partial has no __eq__: the same function and arguments."""
    return bool(a.func is b.func and a.args == b.args and a.keywords == b.keywords)


@pytest.mark.parametrize("obj", FAST, ids=lambda o: type(o).__name__)
def test_each_class_has_the_fast_path(obj: Any) -> None:
    assert type(obj) in copyreg.dispatch_table
    assert b"_rebuild" in pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("obj", [o for o in FAST if type(o) is not TakeInCharge])
def test_round_trip_is_equal_frozen_and_hashable(obj: Any, protocol: int) -> None:
    for back in (
        pickle.loads(pickle.dumps(obj, protocol=protocol)),
        copy.copy(obj),
        copy.deepcopy(obj),
    ):
        assert type(back) is type(obj)
        assert back == obj
        assert [getattr(back, f.name) for f in dataclasses.fields(obj)] == [
            getattr(obj, f.name) for f in dataclasses.fields(obj)
        ]
        with pytest.raises(dataclasses.FrozenInstanceError):
            back.__setattr__(dataclasses.fields(obj)[0].name, None)
        if type(obj) is not TakenInCharge:  # its ``failed`` is a dict: unhashable by design
            assert hash(back) == hash(obj)
        first = dataclasses.fields(obj)[0].name
        assert dataclasses.replace(back, **{first: getattr(obj, first)}) == obj


def test_take_in_charge_round_trip() -> None:
    back = pickle.loads(pickle.dumps(TAKE, protocol=pickle.HIGHEST_PROTOCOL))
    assert (back.envelope, back.deliveries) == (TAKE.envelope, TAKE.deliveries)
    assert same_call(back.presa, TAKE.presa) and same_call(back.answer, TAKE.answer)
    # The envelope the deliveries carry crosses once, and is one object again on the other side.
    envelope = b"x" * 10_000
    shared = dataclasses.replace(
        TAKE, envelope=envelope, deliveries=(dataclasses.replace(DELIVERY, data=envelope),)
    )
    data = pickle.dumps(shared, protocol=5)
    assert len(data) < len(envelope) + 1000
    back = pickle.loads(data)
    assert back.deliveries[0].data is back.envelope


def test_a_message_of_the_worker_protocol_round_trips() -> None:
    """The shapes that cross: a list of answers holding built messages and a TakenInCharge."""
    answers = [(True, [BUILT, BUILT]), (True, TAKEN), (True, [DELIVERED, DELIVERED])]
    assert pickle.loads(pickle.dumps((True, answers), protocol=5)) == (True, answers)


@fast_pickle
@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """Defaults, a default_factory, a field out of __init__, a ClassVar, a __post_init__."""

    name: str
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = dataclasses.field(default_factory=dict)
    derived: int = dataclasses.field(init=False, default=0)
    posts: ClassVar[list[str]] = []

    def __post_init__(self) -> None:
        Sample.posts.append(self.name)
        object.__setattr__(self, "derived", len(self.name))


@fast_pickle
@dataclasses.dataclass(frozen=True, slots=True)
class One:
    only: int


@fast_pickle
@dataclasses.dataclass(frozen=True, slots=True)
class Empty:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class SampleChild(Sample):
    more: int = 1


def test_defaults_factories_and_init_false_fields_round_trip() -> None:
    obj = Sample("abc", ("x",), {"k": 1})
    Sample.posts.clear()
    back = pickle.loads(pickle.dumps(obj, protocol=5))
    assert back == obj and back.derived == 3 and back.extra == {"k": 1}
    assert back.extra is not obj.extra
    assert Sample.posts == []  # rebuilt, not constructed again: __post_init__ did not run
    assert dataclasses.replace(back, name="abcd").derived == 4


def test_one_and_no_field() -> None:
    assert pickle.loads(pickle.dumps(One(7), protocol=5)) == One(7)
    assert pickle.loads(pickle.dumps(Empty(), protocol=5)) == Empty()
    assert copy.deepcopy(One(7)) == One(7)


def test_a_subclass_keeps_the_generic_path() -> None:
    obj = SampleChild("abc", more=5)
    assert SampleChild not in copyreg.dispatch_table
    back = pickle.loads(pickle.dumps(obj, protocol=5))
    assert type(back) is SampleChild and back == obj and back.more == 5


def test_what_is_not_a_slotted_dataclass_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    class Plain:
        pass

    with pytest.raises(TypeError, match="not a slot"):
        fast_pickle(NoSlots)
    with pytest.raises(TypeError, match="not a dataclass"):
        fast_pickle(Plain)
    assert NoSlots not in copyreg.dispatch_table and Plain not in copyreg.dispatch_table


def test_a_pickle_that_does_not_match_its_class_is_refused() -> None:
    """A hand-made pickle with too few or too many values, or the rebuilder on a class that is
    not a slotted dataclass: an error, never a half-built object."""
    fn, (cls, values) = copyreg.dispatch_table[Delivery](DELIVERY)  # type: ignore[misc]
    for wrong in (values[:-1], (*values, "more")):
        with pytest.raises(ValueError):
            pickle.loads(_reduce_pickle(fn, cls, wrong))
    with pytest.raises(TypeError):
        pickle.loads(_reduce_pickle(fn, dict, ()))


class _Reduced:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _reduce_pickle(fn: Any, cls: type, values: tuple[Any, ...]) -> bytes:
    return pickle.dumps(_Reduced(fn, (cls, values)), protocol=5)


def test_rebuilt_where_the_class_was_never_registered() -> None:
    """A pec/ class pickled by the fast path reaches a process that never imported
    runtime/formats.py (which registers it): it is rebuilt all the same."""
    data = pickle.dumps(DATICERT, protocol=5)
    check = (
        "import pickle, sys; d = pickle.loads(sys.stdin.buffer.read()); "
        "print(d.destinatari[1].address, d.ricevuta.value, "
        "'pecd.runtime.formats' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], input=data, capture_output=True, check=True
    ).stdout
    assert out.split() == [b"carol@pec.example.it", b"breve", b"False"]
