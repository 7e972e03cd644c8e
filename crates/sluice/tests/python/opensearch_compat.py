"""opensearch-py against Sluice's built-in search service: index lifecycle, bulk, get,
search with bool/terms/range/match, aggregations, deletes. Prints "ok" at the end."""
import sys

from opensearchpy import OpenSearch, helpers
from opensearchpy.exceptions import NotFoundError, RequestError, ConflictError

url = sys.argv[1]
client = OpenSearch(hosts=[url], timeout=30)

info = client.info()
assert "version" in info, info
index = "products"
assert not client.indices.exists(index=index)
client.indices.create(index=index, body={
    "settings": {"index": {"number_of_shards": 1, "refresh_interval": "100ms"}},
    "mappings": {"properties": {
        "name": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
        "category": {"type": "keyword"},
        "price": {"type": "double"},
        "stock": {"type": "integer"},
        "added": {"type": "date"},
        "active": {"type": "boolean"},
        "variants": {"type": "nested", "properties": {"color": {"type": "keyword"}, "size": {"type": "keyword"}}},
    }},
})
assert client.indices.exists(index=index)
mapping = client.indices.get_mapping(index=index)
assert mapping[index]["mappings"]["properties"]["price"]["type"] == "double", mapping

cats = ["books", "games", "tools"]
docs = [
    {"_index": index, "_id": str(i), "_source": {
        "name": f"item number {i} {'deluxe' if i % 10 == 0 else 'basic'}",
        "category": cats[i % 3], "price": i * 1.5, "stock": i % 7,
        "added": f"2024-01-{1 + i % 28:02d}T10:00:00Z", "active": i % 2 == 0,
        "variants": [{"color": "red" if i % 4 == 0 else "blue", "size": "L"}, {"color": "green", "size": "S"}],
    }}
    for i in range(300)
]
ok, errors = helpers.bulk(client, docs, refresh=True)
assert ok == 300 and not errors, (ok, errors)

assert client.get(index=index, id="42")["_source"]["category"] == "books"
assert client.count(index=index)["count"] == 300

r = client.search(index=index, body={
    "query": {"bool": {
        "filter": [{"terms": {"category": ["books", "games"]}}, {"range": {"price": {"gte": 30, "lt": 150}}}],
        "must": [{"match": {"name": "deluxe"}}],
        "must_not": [{"term": {"active": False}}],
    }},
    "sort": [{"price": "desc"}],
    "size": 50,
})
got = [h["_id"] for h in r["hits"]["hits"]]
want = [str(i) for i in sorted(range(300), key=lambda i: -i)
        if cats[i % 3] in ("books", "games") and 30 <= i * 1.5 < 150 and i % 10 == 0 and i % 2 == 0]
assert got == want, (got, want)
assert r["hits"]["total"]["value"] == len(want)

r = client.search(index=index, body={
    "size": 0,
    "query": {"range": {"added": {"gte": "2024-01-10", "lte": "2024-01-20T23:59:59Z"}}},
    "aggs": {
        "by_cat": {"terms": {"field": "category", "size": 10}, "aggs": {"avg_price": {"avg": {"field": "price"}}}},
        "max_stock": {"max": {"field": "stock"}},
        "in_stock": {"filter": {"range": {"stock": {"gt": 0}}}},
        "distinct": {"cardinality": {"field": "category"}},
    },
})
sel = [i for i in range(300) if 10 <= 1 + i % 28 <= 20]
assert r["hits"]["total"]["value"] == len(sel), r["hits"]["total"]
buckets = {b["key"]: b for b in r["aggregations"]["by_cat"]["buckets"]}
for c in cats:
    members = [i for i in sel if cats[i % 3] == c]
    assert buckets[c]["doc_count"] == len(members), (c, buckets[c])
    assert abs(buckets[c]["avg_price"]["value"] - sum(i * 1.5 for i in members) / len(members)) < 1e-9
assert r["aggregations"]["max_stock"]["value"] == 6
assert r["aggregations"]["in_stock"]["doc_count"] == len([i for i in sel if i % 7 > 0])
assert r["aggregations"]["distinct"]["value"] == 3

# nested: one variant must be red AND size L
r = client.search(index=index, body={"query": {"nested": {"path": "variants", "query": {"bool": {"must": [
    {"term": {"variants.color": "red"}}, {"term": {"variants.size": "L"}}]}}}}, "size": 0})
assert r["hits"]["total"]["value"] == len([i for i in range(300) if i % 4 == 0])
r = client.search(index=index, body={"query": {"nested": {"path": "variants", "query": {"bool": {"must": [
    {"term": {"variants.color": "green"}}, {"term": {"variants.size": "L"}}]}}}}, "size": 0})
assert r["hits"]["total"]["value"] == 0

# search_after paging visits every document once
seen, after = [], None
while True:
    body = {"size": 70, "sort": [{"stock": "asc"}, {"name.keyword": "asc"}], "_source": ["name"]}
    if after:
        body["search_after"] = after
    hits = client.search(index=index, body=body)["hits"]["hits"]
    if not hits:
        break
    seen += [h["_id"] for h in hits]
    after = hits[-1]["sort"]
assert sorted(seen, key=int) == [str(i) for i in range(300)], len(seen)

# update, delete, conflicts, errors
client.update(index=index, id="1", body={"doc": {"stock": 99}}, refresh=True)
assert client.get(index=index, id="1")["_source"]["stock"] == 99
client.delete(index=index, id="2", refresh=True)
try:
    client.get(index=index, id="2")
    raise AssertionError("deleted document still found")
except NotFoundError:
    pass
client.index(index=index, id="ext", body={"name": "x"}, version=5, version_type="external", refresh=True)
try:
    client.index(index=index, id="ext", body={"name": "y"}, version=4, version_type="external")
    raise AssertionError("older external version accepted")
except ConflictError:
    pass
try:
    client.search(index=index, body={"query": {"no_such_query": {}}})
    raise AssertionError("unknown query accepted")
except RequestError as e:
    assert e.error == "parsing_exception", e.error
assert client.count(index=index)["count"] == 300

client.indices.delete(index=index)
assert not client.indices.exists(index=index)
print("ok")
