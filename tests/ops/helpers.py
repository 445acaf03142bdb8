"""Reading `/metrics` in tests: parse the exposition text into samples, compare scrapes."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

MANIFEST_ROUTE = "/v2/{name}/manifests/{reference}"
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"
UPLOADS_ROUTE = "/v2/{name}/blobs/uploads/"
UPLOAD_ROUTE = "/v2/{name}/blobs/uploads/{upload_id}"


@dataclass(frozen=True)
class Samples:
    """One scrape: sample name + labels → value."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    text: str

    def get(self, name: str, **labels: str) -> float:
        """A sample's value (0 when it is absent, as for a counter not yet touched)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.values}

    def label_values(self, label: str) -> set[str]:
        return {v for _, labels in self.values for k, v in labels if k == label}


def parse(text: str) -> Samples:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Samples(values, text)


async def scrape(client: TestClient, path: str = "/metrics") -> Samples:
    resp = await client.get(path)
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
    return parse(text)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)
