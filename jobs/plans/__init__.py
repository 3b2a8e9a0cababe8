"""Plan bills from meterline's own data (ClickHouse + the subscription timeline)."""
