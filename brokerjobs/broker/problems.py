"""Error texts both broker implementations give for the same refusal."""

from __future__ import annotations


def mismatch_message(what: str, name: str, broker_text: str) -> str:
    """TopologyMismatch's message for the broker's PRECONDITION_FAILED ``broker_text``."""
    marker = "inequivalent arg '"
    argument = broker_text.split(marker, 1)[1].split("'", 1)[0] if marker in broker_text else None
    differing = f"argument {argument!r} differs" if argument else "its arguments differ"
    if what == "exchange":
        fix = (
            "An exchange's type cannot change in place: delete the exchange (`rabbitmqadmin "
            f"delete exchange name={name}`) and declare again, or change the app to match."
        )
    else:
        fix = (
            "Queue arguments cannot change in place: drain and delete the queue "
            f"(rabbitmqctl delete_queue {name}) and declare again, or change the app to match."
        )
    found = f"{what} {name!r} already exists and {differing} from the plan"
    return f"{found} (broker: {broker_text}). {fix}"


def missing_message(what: str, name: str) -> str:
    return f"{what} {name!r} does not exist: run `brokerjobs topology declare MODULE:APP`"
