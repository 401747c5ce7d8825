"""SlideGraph+: graph construction, content-keyed cache, EdgeConv, learning on the planted cohort, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from her2ray.features.schema import feature_url
from her2ray.models import build_model, collate_for, make_dataset
from her2ray.models.slidegraph import EdgeConv, scatter_pool
from her2ray.models.slidegraph_graph import GraphParams, build_graph, cached_graph, delaunay_edges, graph_key
from her2ray.training.config import TrainConfig
from her2ray.training.loop import FoldSpec, train_fold
from her2ray.training.synthetic import make_feature_store

# Synthetic features are N(0, 1) in 32 dims: the feature decay must be set for that scale (see README).
SG = dict(model="slidegraph", lr=3e-3, weight_decay=1e-4, aug_rate=0.0, batch_size=8, graph_lambda_f=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clusters_follow_space_and_features_and_edges_respect_the_cut():
    # Two 3x3 tile groups 20 tiles apart; in the left group the middle row has other features.
    xy = [(c * 256, r * 256) for r in range(3) for c in range(3)]
    xy += [(x + 20 * 256, y) for x, y in xy]
    coords = np.array(xy, dtype=np.float64)
    feats = np.zeros((18, 4), np.float32)
    feats[3:6] = 40.0
    params = GraphParams(lambda_f=0.1)
    g = build_graph(coords, feats, 256, params)
    # far-apart groups never share a node; the distinct middle row is its own node
    assert not set(g.tile_node[:9]) & set(g.tile_node[9:])
    assert len(set(g.tile_node[3:6])) == 1 and g.tile_node[3] not in set(g.tile_node[[0, 1, 2, 6, 7, 8]])
    np.testing.assert_allclose(g.node_features[g.tile_node[4]], 40.0)        # node feature = mean of tiles
    assert g.n_nodes == len(np.unique(g.tile_node)) >= 3
    # the two groups are 20 tiles (5120 px) apart: above the 4000 px cut, so no edge crosses
    src, dst = g.edge_index
    left = set(np.unique(g.tile_node[:9]).tolist())
    assert all((int(a) in left) == (int(b) in left) for a, b in zip(src, dst))
    # with features ignored (lambda_f tiny) the left group is one node
    assert len(set(build_graph(coords, feats, 256, GraphParams(lambda_f=1e-9)).tile_node[:9])) == 1


def test_delaunay_edges_are_symmetric_and_cut_by_length():
    pts = np.array([[0, 0], [100, 0], [0, 100], [100, 100], [5000, 5000]], dtype=np.float64)
    e = delaunay_edges(pts, 200.0)
    pairs = set(zip(e[0].tolist(), e[1].tolist()))
    assert all((b, a) in pairs for a, b in pairs) and all(a != b for a, b in pairs)
    assert not any(4 in p for p in pairs) and (0, 1) in pairs and (0, 2) in pairs
    assert delaunay_edges(pts[:2], 50.0).shape == (2, 0)          # too few points, too far: no edge


def test_large_slides_are_pooled_and_every_tile_keeps_a_node():
    rng = np.random.default_rng(0)
    coords = np.array([(c * 256, r * 256) for r in range(40) for c in range(40)], dtype=np.float64)
    g = build_graph(coords, rng.standard_normal((1600, 8)).astype(np.float32), 256, GraphParams(max_tiles=400))
    assert g.pool == 2 and len(g.tile_node) == 1600 and g.tile_node.max() == g.n_nodes - 1


def test_cache_is_content_keyed(tmp_path):
    store = str(tmp_path / "store")
    make_feature_store(store, n_slides=1, n_tiles=25, dim=8, seed=0)
    from her2ray.features.schema import read_slide_features

    url = feature_url(store, "S0000")
    sf = read_slide_features(url)
    args = (url, "S0000", sf.coords, sf.features, 256.0)
    g1, hit1 = cached_graph(*args, GraphParams())
    g2, hit2 = cached_graph(*args, GraphParams())
    assert (hit1, hit2) == (False, True) and np.array_equal(g1.tile_node, g2.tile_node)
    assert len(list((tmp_path / "store" / "graphs").glob("S0000.*.npz"))) == 1
    _, hit3 = cached_graph(*args, GraphParams(lambda_h=0.5))                # other parameters: other key
    changed = sf.features.copy()
    changed[0, 0] += 1.0
    assert not hit3 and graph_key(sf.coords, changed, 256.0, GraphParams()) != \
        graph_key(sf.coords, sf.features, 256.0, GraphParams())


def test_edgeconv_matches_a_loop_and_pooling_by_graph():
    torch.manual_seed(0)
    conv = EdgeConv(3, 5).eval()
    h = torch.randn(4, 3)
    edges = torch.tensor([[1, 2, 0, 3], [0, 0, 1, 1]])       # j -> i
    out = conv(h, edges)
    for i in range(4):
        nbrs = [int(j) for j, k in zip(edges[0], edges[1]) if int(k) == i]
        want = (torch.stack([conv.mlp(torch.cat([h[i], h[j] - h[i]]).unsqueeze(0))[0] for j in nbrs]).amax(0)
                if nbrs else torch.zeros(5))
        torch.testing.assert_close(out[i], want)
    v = torch.tensor([[1.0], [3.0], [5.0]])
    idx = torch.tensor([0, 0, 1])
    assert scatter_pool(v, idx, 2, "mean").flatten().tolist() == [2.0, 5.0]
    assert scatter_pool(v, idx, 2, "max").flatten().tolist() == [3.0, 5.0]


def test_batched_graphs_give_the_same_logits_as_one_at_a_time(tmp_path):
    store = str(tmp_path / "s")
    make_feature_store(store, n_slides=3, n_tiles=30, dim=8, seed=0)
    urls = [feature_url(store, f"S{i:04d}") for i in range(3)]
    ds = make_dataset("slidegraph", urls, [0, 1, 2], aug_rate=0.0, seed=0, graph={"lambda_f": 0.1})
    model = build_model("slidegraph", 8, 4).eval()
    collate = collate_for("slidegraph")
    together = model.forward_batch(collate([ds[i] for i in range(3)]))
    alone = torch.cat([model.forward_batch(collate([ds[i]])) for i in range(3)])
    torch.testing.assert_close(together, alone)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("sg")
    for name, signal in (("signal", 8.0), ("null", 0.0)):
        make_feature_store(str(base / name), n_slides=56, n_tiles=64, dim=32, seed=1, signal=signal)
    return base


def _spec(store, out, **over) -> FoldSpec:
    rows = [(f"S{i:04d}", i % 4) for i in range(56)]

    def part(rs):
        return [r[0] for r in rs], [feature_url(store, r[0]) for r in rs], [r[1] for r in rs]

    (a, b, c), (d, e, f), (g, h, i) = part(rows[:32]), part(rows[32:44]), part(rows[44:])
    cfg = TrainConfig(**{**SG, **over})
    return FoldSpec(fold=0, out_dir=out, config=cfg.to_dict(), patch_dim=32, seed=0, train_ids=a, train_urls=b,
                    train_labels=c, val_ids=d, val_urls=e, val_labels=f, test_ids=g, test_urls=h, test_labels=i)


def test_slidegraph_learns_the_planted_signal_and_scores_with_tile_maps(planted, tmp_path):
    from her2ray.features.schema import read_slide_features
    from her2ray.scoring.engine import FoldEnsemble, score_features

    run = tmp_path / "run"
    res = train_fold(_spec(str(planted / "signal"), str(run / "folds" / "fold-0"), max_epochs=12, patience=12))
    assert res["test_metrics"]["auc_macro_ovr"] >= 0.9, res["history"]
    ens = FoldEnsemble.from_run(str(run))
    assert ens.model_name == "slidegraph"
    sf = read_slide_features(feature_url(str(planted / "signal"), "S0047"))
    fields, table = score_features(ens, sf, attention=True)
    assert abs(sum(fields[c] for c in ("prob_her2_0", "prob_her2_1plus", "prob_her2_2plus",
                                       "prob_her2_3plus")) - 1) < 1e-6
    assert fields["n_tiles_used"] == 64 and table.num_rows == 64
    scores = np.asarray(table.column("score"))
    assert ((scores >= 0) & (scores <= 1)).all() and len(np.unique(scores)) > 1   # node scores spread to tiles


def test_slidegraph_stays_at_chance_without_signal(planted, tmp_path):
    res = train_fold(_spec(str(planted / "null"), str(tmp_path / "f"), max_epochs=6, patience=3))
    assert res["test_metrics"]["auc_macro_ovr"] < 0.75


def test_runs_made_before_the_slidegraph_settings_still_resume(tmp_path):
    import json

    from her2ray.errors import ConfigError
    from her2ray.training.run import check_resume_config

    old = TrainConfig().to_dict()
    for key in [k for k in old if k.startswith(("sg_", "graph_"))]:
        del old[key]                                   # a run.json written by an older her2ray
    (tmp_path / "run.json").write_text(json.dumps({"config": old}))
    check_resume_config(str(tmp_path), TrainConfig())
    with pytest.raises(ConfigError, match="sg_dropout"):
        check_resume_config(str(tmp_path), TrainConfig(sg_dropout=0.1))


def test_graphs_are_prebuilt_once_for_all_folds(tmp_path):
    from her2ray.training.graphs import prebuild_graphs

    store = str(tmp_path / "s")
    make_feature_store(store, n_slides=3, n_tiles=20, dim=8, seed=0)
    urls = [feature_url(store, f"S{i:04d}") for i in range(3)]
    assert prebuild_graphs(urls + urls[:1], {"lambda_f": 0.1}, local=True) == {"cached": 0, "built": 3}
    assert prebuild_graphs(urls, {"lambda_f": 0.1}, local=True) == {"cached": 3, "built": 0}
    ds = make_dataset("slidegraph", urls, [0, 1, 2], aug_rate=0.0, seed=0, graph={"lambda_f": 0.1})
    _ = [ds[i] for i in range(3)]
    assert ds.graphs_built == 0                       # the folds only read the cache
