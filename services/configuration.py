"""``ULocationSystem::ConfigurationUpdate``: the configuration of a site's sensors.

A sample service: one persistent relation of sensors (where each sends its location
events, at what rate, how often it was rebooted) and the update operations an
installer uses. Deployed at the site level, it is the demo's example of durable state.
"""

from __future__ import annotations

from typing import Any

from ubicore.errors import BadArguments, NotFound
from ubicore.schema import Column, Relation, Schema, read, update
from ubicore.store import Transaction

SCHEMA = "ULocationSystem::ConfigurationUpdate"
MAX_RATE_HZ = 1000.0
DEFAULT_SENSORS = ("S-001", "S-002", "S-003", "S-004")


def _check_rate(rate_hz: float) -> None:
    if not 0.0 < rate_hz <= MAX_RATE_HZ:
        raise BadArguments(f"rate_hz must be in (0, {MAX_RATE_HZ:g}], got {rate_hz:g}", {"argument": "rate_hz"})


def _sensor(tx: Transaction, sensor: str) -> Any:
    row = tx.sensors.get(sensor)
    if row is None:
        raise NotFound(f"no sensor {sensor!r}")
    return row


class ConfigurationUpdate(Schema, name=SCHEMA, protection="update"):
    """Sensor configuration: location sinks, rates, reboots."""

    sensors = Relation(
        Column("sensor", str),
        Column("sink", str, default=""),
        Column("rate_hz", float, default=1.0),
        Column("state", str, default="running"),
        Column("reboots", int, default=0),
        key=("sensor",),
        persistent=True,
    )

    async def run(self, ctx: Any) -> None:
        """Seed the sensors named in the options (default four) on a fresh dataset."""
        with ctx.transaction() as tx:
            if len(tx.sensors) == 0:
                for name in self.options.get("sensors", DEFAULT_SENSORS):
                    tx.sensors.insert(sensor=str(name))

    @update
    def add_sensor(self, tx: Transaction, sensor: str, sink: str = "", rate_hz: float = 1.0) -> None:
        """Add a sensor."""
        _check_rate(rate_hz)
        if tx.sensors.get(sensor) is not None:
            raise BadArguments(f"sensor {sensor!r} exists", {"argument": "sensor"})
        tx.sensors.insert(sensor=sensor, sink=sink, rate_hz=rate_hz)

    @update
    def remove_sensor(self, tx: Transaction, sensor: str) -> None:
        """Remove a sensor."""
        _sensor(tx, sensor)
        tx.sensors.delete(sensor)

    @update
    def set_sink(self, tx: Transaction, sensor: str, sink: str) -> None:
        """Set where a sensor sends its location events."""
        _sensor(tx, sensor)
        tx.sensors.update(sensor=sensor, sink=sink)

    @update
    def set_rate(self, tx: Transaction, sensor: str, rate_hz: float) -> None:
        """Set a sensor's update rate in hertz."""
        _check_rate(rate_hz)
        _sensor(tx, sensor)
        tx.sensors.update(sensor=sensor, rate_hz=rate_hz)

    @update
    def reboot(self, tx: Transaction, sensor: str) -> int:
        """Reboot a sensor; returns how many times it has been rebooted."""
        row = _sensor(tx, sensor)
        tx.sensors.update(sensor=sensor, reboots=row.reboots + 1, state="running")
        return int(row.reboots + 1)

    @read
    def get_sensor(self, tx: Transaction, sensor: str) -> dict[str, Any]:
        """One sensor's configuration."""
        return _sensor(tx, sensor)._asdict()  # type: ignore[no-any-return]

    @read
    def list_sensors(self, tx: Transaction) -> list[str]:
        """The names of every sensor."""
        return sorted(row.sensor for row in tx.sensors)
