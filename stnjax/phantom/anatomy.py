"""Anatomy of the phantom generator: the label and tissue catalogue and the
painters that lay out one virtual patient on a `Canvas`.

The catalogue: `LABELS` (TotalSegmentator v2 "total" ids written to the label
maps; the pancreas is `PANCREAS_ID` = 7; vertebrae are labelled by level, T9-L5
= 35-27, from a varied L1/L2 disc height; the SMA, ribs, lymph nodes, small
vessels and fat are unlabelled, 0) and `TISSUES` (tissue classes with their
mean and texture HU, indexed by `TISSUE_ID`).

`paint_anatomy` paints, in this order (a later structure replaces only what has
a lower or equal priority `P_*`):

* body outline (a varied super-ellipse) with subcutaneous fat, a muscle wall
  and ribs in the upper slices;
* spine (vertebral bodies with cortex, marrow and discs, posterior elements,
  spinal canal and cord), paraspinal and psoas muscles;
* aorta, SMA, IVC, portal vein and SMV;
* liver with vessels, gallbladder, spleen, kidneys (cortex and medulla) and
  lung bases at the top;
* stomach with an air pocket, duodenal C-loop, small-bowel loops and colon with
  mixed content (fluid, chyme of soft-tissue density, gas, stool), lymph nodes
  and small mesenteric vessels;
* a small curved, lobulated pancreas (head in the duodenal C-loop, uncinate
  process behind the SMV, neck in front of the confluence, body and tail
  rising towards the splenic hilum) with fatty clefts, the splenic vein along
  its back and the splenic artery above it.

Positions are in mm of the patient (see `stnjax.phantom.geometry`); the
intensities, blur and noise are applied by `stnjax.phantom.render_phantom`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stnjax.checks import InputError
from stnjax.phantom.geometry import (Canvas, Grid, curve, ellipsoid, ellipsoid_on,
                                     random_walk, rotation, tube)

if TYPE_CHECKING:  # only for the hint: stnjax.phantom imports this module
    from stnjax.phantom.volumes import PhantomConfig

PANCREAS_ID = 7

#: Label ids written to the label maps (TotalSegmentator v2 "total" names).
LABELS: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder",
    5: "liver", 6: "stomach", 7: "pancreas", 11: "lung_lower_lobe_left",
    14: "lung_lower_lobe_right", 18: "small_bowel", 19: "duodenum",
    20: "colon", 27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3",
    30: "vertebrae_L2", 31: "vertebrae_L1", 32: "vertebrae_T12",
    33: "vertebrae_T11", 34: "vertebrae_T10", 35: "vertebrae_T9",
    52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein",
    79: "spinal_cord", 86: "autochthon_left", 87: "autochthon_right",
    88: "iliopsoas_left", 89: "iliopsoas_right",
}

#: Tissue classes that set the intensity: (name, mean HU, texture std HU).
#: Means are jittered per case (contrast timing) by `stnjax.phantom`.
TISSUES: tuple[tuple[str, float, float], ...] = (
    ("air", -1000.0, 0.0), ("subcutaneous_fat", -105.0, 10.0),
    ("visceral_fat", -92.0, 12.0), ("muscle", 50.0, 8.0),
    ("bone_cortex", 700.0, 50.0), ("bone_marrow", 330.0, 35.0),
    ("disc", 85.0, 8.0), ("csf", 12.0, 5.0), ("spinal_cord", 35.0, 5.0),
    ("liver", 92.0, 7.0), ("liver_vessel", 165.0, 10.0),
    ("gallbladder", 12.0, 5.0), ("spleen", 105.0, 7.0),
    ("kidney_cortex", 185.0, 12.0), ("kidney_medulla", 125.0, 10.0),
    ("gut_wall", 95.0, 10.0), ("gut_fluid", 15.0, 8.0),
    ("gut_chyme", 65.0, 15.0), ("stool", 5.0, 35.0), ("gas", -990.0, 5.0),
    ("artery", 190.0, 8.0), ("portal_vein", 170.0, 8.0), ("ivc", 145.0, 8.0),
    ("pancreas", 100.0, 12.0), ("pancreas_fat", -40.0, 25.0),
    ("lymph_node", 55.0, 8.0), ("lung", -850.0, 30.0), ("rib", 550.0, 60.0),
)
#: Tissue name -> index into TISSUES (the values of `stnjax.phantom.volumes.Phantom.tissue`).
TISSUE_ID = {name: i for i, (name, _, _) in enumerate(TISSUES)}
_T = TISSUE_ID


# Priorities: a structure replaces only what has a lower or equal rank.
P_FAT, P_WALL, P_CAVITY, P_COLON, P_BOWEL, P_NODE, P_MESO, P_STOMACH = 1, 2, 3, 4, 5, 6, 7, 8
P_DUODENUM, P_LIVER, P_GALL, P_SPLEEN, P_KIDNEY, P_PANCREAS = 9, 10, 11, 12, 13, 14
P_VEIN, P_ARTERY, P_LUNG, P_MUSCLE, P_BONE, P_CORD = 15, 16, 17, 17, 18, 19


def _body(rng, g, cv):
    """Body outline, subcutaneous fat, muscle wall, ribs. Returns the anchors
    and the peritoneal/retroperitoneal cavity mask (X,Y,Z) bool."""
    a, b, c = g.axes
    a0, b0 = rng.uniform(-5, 8), rng.uniform(-6, 6)
    a_ant, a_post, half_w = rng.uniform(92, 112), rng.uniform(95, 108), rng.uniform(122, 148)
    da, db = a[:, None] - a0, b[None, :] - b0
    theta = np.arctan2(db, da)  # 0 = posterior, +-pi = anterior
    wobble = (1 + 0.025 * np.cos(2 * theta + rng.uniform(0, 6.3))
              + 0.015 * np.cos(3 * theta + rng.uniform(0, 6.3)))
    semi_a, n = np.where(da < 0, a_ant, a_post), np.where(da < 0, 2.1, 2.8)
    rho2 = ((np.abs(da) / semi_a) ** n + (np.abs(db) / half_w) ** n) ** (1 / n) / wobble
    taper = 1 + rng.uniform(-0.05, 0.04) * c / 128  # (Z,)
    rho = (rho2[:, :, None] / taper).astype(np.float32)
    r = np.hypot(da, db).astype(np.float32)[:, :, None]
    depth = r / np.maximum(rho, 1e-3) - r  # mm inside the skin along the ray
    t_fat = (rng.uniform(8, 24) * (1 - 0.45 * np.cos(theta)))[:, :, None]  # thinner at the back
    t_wall = rng.uniform(8, 12)
    body = rho <= 1
    fat = body & (depth < t_fat)
    wall = body & ~fat & (depth < t_fat + t_wall)
    cavity = body & (depth >= t_fat + t_wall)
    full = (slice(None),) * 3
    cv.paint(full, body, _T["subcutaneous_fat"], 0, P_FAT)
    cv.paint(full, wall, _T["muscle"], 0, P_WALL)
    cv.paint(full, cavity, _T["visceral_fat"], 0, P_CAVITY)
    # Ribs: cross-sections in the wall of the upper abdomen, sloping down anteriorly.
    ang = np.abs(theta)[:, :, None]
    band = np.mod(c[None, None, :] + 28 * ang / np.pi + rng.uniform(0, 24), 24) < 8
    ribs = (body & (depth > t_fat + 1) & (depth < t_fat + t_wall + 5) & (ang > 0.5) & (ang < 2.5)
            & band & (c[None, None, :] - 30 * ang / np.pi > rng.uniform(-15, 15)))
    cv.paint(full, ribs, _T["rib"], 0, P_BONE)
    return dict(a0=a0, b0=b0, a_back=a0 + a_post, a_front=a0 - a_ant, half_w=half_w), cavity, fat


def _spine(rng, g, cv, anc, fat):
    """Vertebrae (bodies, discs, posterior elements), canal and cord,
    paraspinal and psoas muscles. Adds the spine anchors to `anc`."""
    a_v = anc["a_back"] - rng.uniform(68, 78)
    b_v = anc["b0"] + rng.uniform(-3, 3)
    period, disc_h, c_d0 = rng.uniform(33, 38), rng.uniform(7, 9), rng.uniform(-35, -10)
    anc.update(a_v=a_v, b_v=b_v, c_d0=c_d0)
    sl = g.box((a_v - 25, b_v - 50, -1e3), (a_v + 75, b_v + 50, 1e3))
    a, b, c = g.coords(sl)
    level = np.floor((c - c_d0 - disc_h / 2) / period)
    disc = np.mod(c - c_d0 + disc_h / 2, period) < disc_h
    vlabel = np.clip(31 + level, 27, 35).astype(np.uint8)  # 31 = L1, above: T12...; below: L2...
    grow = 1 + 0.1 * (-c / 128)
    q = np.hypot((a - a_v) / (15 * grow), (b - b_v) / (19 * grow))
    lab = np.broadcast_to(vlabel, q.shape)
    for mask, tissue in (((q <= 0.82) & ~disc, "bone_marrow"),
                         ((q > 0.82) & (q <= 1) & ~disc, "bone_cortex")):
        cv.paint(sl, mask, _T[tissue], 0, P_BONE)
        cv.label[sl][mask] = lab[mask]
    cv.paint(sl, (q <= 1.03) & disc, _T["disc"], 0, P_BONE)
    a_c = a_v + 24
    rc = np.hypot(a - a_c, b - b_v)
    phase = np.mod(c - c_d0 - disc_h / 2, period)
    mid = phase < period - disc_h  # vertebra level, not disc
    thick = np.abs(phase - (period - disc_h) / 2) < 6  # transverse processes: mid-height only
    post = (((rc > 8.5) & (rc <= 13.5) & (a > a_v + 12))
            | ((a > a_c + 9) & (a < a_c + 36) & (np.abs(b - b_v) < 3.5))
            | ((np.abs(a - a_c + 3) < 2.5) & (np.abs(b - b_v) > 10) & (np.abs(b - b_v) < 32)
               & thick)) & mid
    cv.paint(sl, post, _T["bone_cortex"], 0, P_BONE)
    cv.label[sl][post] = np.broadcast_to(vlabel, post.shape)[post]
    cv.paint(sl, rc <= 8.5, _T["csf"], 0, P_CORD)
    cv.paint(sl, rc <= 4.5, _T["spinal_cord"], 79, P_CORD)
    for side, lab_m in ((1, 86), (-1, 87)):  # autochthon left (+b) / right
        msk = np.hypot((a - a_c - 22) / 20, (b - b_v - side * 26) / 19) <= 1
        cv.paint(sl, msk & ~fat[sl], _T["muscle"], lab_m, P_MUSCLE)
    # Psoas: grows from T12/L1 downwards beside the vertebral bodies.
    rad = np.clip(2 + 15 * (c_d0 + period - c) / 110, 0, 17)
    for side, lab_m in ((1, 88), (-1, 89)):
        msk = np.hypot((a - a_v - 2 - 0.3 * rad) / 1.0, (b - b_v - side * (17 + rad)) / 0.85) <= rad
        cv.paint(sl, msk & (rad > 3), _T["muscle"], lab_m, P_MUSCLE)


def _paint_tube(g, cv, points, radii, tissue, label, prio, clip=None):
    sl, sdf = tube(g, points, radii)
    if sl is not None:
        cv.paint(sl, (sdf <= 0) if clip is None else (sdf <= 0) & clip[sl], tissue, label, prio)
    return sl, sdf


def _vessels(rng, g, cv, anc):
    """Aorta, SMA, IVC, SMV and portal vein. Adds the splenoportal
    confluence (a_cf, b_cf, c_cf) and the aorta position to `anc`."""
    a_v, b_v = anc["a_v"], anc["b_v"]
    zs = np.linspace(-150, 150, 5)
    a_ao, b_ao = a_v - 29 + rng.uniform(-2, 2), b_v + 12 + rng.uniform(-3, 3)
    wander = rng.normal(0, 2, (5, 2))
    r_ao = rng.uniform(10, 12.5)
    _paint_tube(g, cv, np.c_[a_ao + wander[:, 0], b_ao + wander[:, 1], zs],
                r_ao * np.linspace(0.85, 1.05, 5), _T["artery"], 52, P_ARTERY)
    _paint_tube(g, cv, np.c_[a_v - 25 + wander[:, 1], b_v - 24 + wander[:, 0], zs],
                np.full(5, rng.uniform(9, 12)), _T["ivc"], 63, P_VEIN)
    c_cf = anc["c_d0"] + rng.uniform(0, 20)
    a_cf, b_cf = a_ao - rng.uniform(25, 31), b_v - rng.uniform(5, 10)
    sma = [(a_ao - 6, b_ao - 1, c_cf + 10), (a_ao - 17, b_ao - 4, c_cf - 6),
           (a_ao - 28, b_ao - 6, c_cf - 45), (a_ao - 36, b_ao - 9, -150)]
    _paint_tube(g, cv, sma, [4.5, 4, 3.5, 3], _T["artery"], 0, P_ARTERY)
    smv = [(a_cf, b_cf, c_cf), (a_cf - 4, b_cf - 3, c_cf - 40), (a_cf - 10, b_cf - 6, -150)]
    _paint_tube(g, cv, smv, [6, 5.5, 5], _T["portal_vein"], 64, P_VEIN)
    portal = [(a_cf, b_cf, c_cf), (a_cf + 2, b_cf - 22, c_cf + 18),
              (a_cf + 6, b_cf - 45, c_cf + 38), (a_cf + 2, b_cf - 62, c_cf + 50)]
    _paint_tube(g, cv, portal, [7, 7, 6.5, 5.5], _T["portal_vein"], 64, P_VEIN)
    anc.update(a_ao=a_ao, b_ao=b_ao, r_ao=r_ao, a_cf=a_cf, b_cf=b_cf, c_cf=c_cf,
               hilum=np.array(portal[-1]), sma=np.array(sma), smv=np.array(smv))


def _organs(rng, g, cv, anc, cavity, wob):
    """Liver (with vessels), gallbladder, spleen, kidneys, lung bases."""
    a0, b0, a_v, b_v, c_cf = anc["a0"], anc["b0"], anc["a_v"], anc["b_v"], anc["c_cf"]
    j = lambda s=5.0: rng.uniform(-s, s)  # noqa: E731  per-organ jitter

    def blob(centre, semi, rot, tissue, label, prio, amp=0.05):
        sl, q = ellipsoid(g, centre, semi, rot)
        if sl is not None:
            cv.paint(sl, (q <= 1 + amp * wob[sl]) & cavity[sl], _T[tissue], label, prio)
        return sl, q

    s = rng.uniform(0.9, 1.08)
    blob((a0 - 5 + j(), b0 - 58 + j(), c_cf + 75 + j()), np.multiply((95, 82, 85), s),
         rotation(j(10)), "liver", 5, P_LIVER)
    blob((a0 - 55 + j(), b0 + 8 + j(), c_cf + 70 + j()),  # left lobe
         np.multiply((32, 58, 28), rng.uniform(0.7, 1.2)), rotation(j(10)), "liver", 5, P_LIVER)
    in_liver = cv.label == 5
    hv_top = (a_v - 25, b_v - 24, c_cf + 95)
    hepatic = ((a0 - 60, b0 - 30, c_cf + 80), (a0 - 30, b0 - 100, c_cf + 70),
               (a0 - 70, b0 + 20, c_cf + 85))
    portal = ((a0 - 40, b0 - 80, c_cf + 40), (a0 - 5, b0 - 110, c_cf + 55),
              (a0 - 50, b0 - 10, c_cf + 60))
    for start, ends, r0 in ((hv_top, hepatic, 4.5), (anc["hilum"], portal, 4.0)):
        for end in ends:  # hepatic veins from the IVC, portal branches from the hilum
            _paint_tube(g, cv, [start, np.add(end, (j(8), j(8), j(8)))], [r0, 1.5],
                        _T["liver_vessel"], 5, P_LIVER, clip=in_liver)
    if rng.uniform() > 0.15:  # gallbladder (absent after cholecystectomy)
        blob((a0 - 52 + j(), b0 - 45 + j(), c_cf + 10 + j()),
             np.multiply((14, 14, 30), rng.uniform(0.6, 1.1)), rotation(j(20), 25),
             "gallbladder", 4, P_GALL, amp=0.02)
    centre = np.array((a_v + 5 + j(), b0 + 0.72 * anc["half_w"] + j(), c_cf + 52 + j(8)))
    semi = np.multiply((45, 22, 50), rng.uniform(0.8, 1.15))
    sl, q = ellipsoid(g, centre, semi, rotation(-35 + j(10)))
    if sl is not None:  # carve the hilum (anterior-medial): a crescent
        _, q_h = ellipsoid_on(g, sl, centre + (-22, -20, 0), semi * (0.55, 0.6, 0.7))
        cv.paint(sl, (q <= 1 + 0.05 * wob[sl]) & (q_h > 1) & cavity[sl], _T["spleen"], 1, P_SPLEEN)
    for side, label, dc in ((-1, 2, -32), (1, 3, -18)):
        centre = np.array((a_v + 8 + j(), b_v + side * 70 + j(), c_cf + dc + j(8)))
        semi = np.multiply((22, 28, 52), rng.uniform(0.88, 1.1))
        sl, q = ellipsoid(g, centre, semi, rotation(-side * 25 + j(8), side * 8))
        if sl is None:
            continue
        kid = (q <= 1 + 0.03 * wob[sl]) & cavity[sl]
        cv.paint(sl, kid & (q > 0.7), _T["kidney_cortex"], label, P_KIDNEY)
        cv.paint(sl, kid & (q <= 0.7), _T["kidney_medulla"], label, P_KIDNEY)
        _, q_s = ellipsoid_on(g, sl, centre + (-6, -side * 15, 0), (9, 12, 22))
        cv.paint(sl, kid & (q_s <= 1), _T["visceral_fat"], 0, P_KIDNEY)  # renal sinus fat
    for side, label in ((1, 11), (-1, 14)):
        blob((a_v + 10 + j(), b_v + side * 75 + j(), c_cf + 200 + j(15)), (75, 60, 95), None,
             "lung", label, P_LUNG, amp=0.02)


def _gut_tube(rng, g, cv, points, radius, label, prio, cavity, tex, contents):
    """A hollow viscus: wall of gut_wall tissue and a lumen whose content is
    drawn from `contents` (tissue names with probabilities) per structure."""
    sl, sdf = tube(g, points, np.full(len(points), radius))
    if sl is None:
        return
    inside = (sdf <= 0) & cavity[sl]
    cv.paint(sl, inside, _T["gut_wall"], label, prio)
    lumen = inside & (sdf <= -rng.uniform(2.0, 3.0))
    names, probs = zip(*contents)
    kind = names[rng.choice(len(names), p=probs)]
    if kind == "gas_mix":  # chyme with gas bubbles
        cv.paint(sl, lumen, _T["gut_chyme"], label, prio)
        cv.paint(sl, lumen & (tex[sl] > 1.0), _T["gas"], label, prio)
    elif kind == "stool":  # mottled stool with gas
        cv.paint(sl, lumen, _T["stool"], label, prio)
        cv.paint(sl, lumen & (tex[sl] > 0.3), _T["gas"], label, prio)
    else:
        cv.paint(sl, lumen, _T[kind], label, prio)


def _gut(rng, g, cv, anc, cavity, wob, tex, num_loops):
    """Stomach with an air pocket, duodenal C-loop, small bowel, colon, lymph
    nodes and small mesenteric vessels."""
    a0, b0, a_v, b_v = anc["a0"], anc["b0"], anc["a_v"], anc["b_v"]
    a_cf, c_cf = anc["a_cf"], anc["c_cf"]
    a_ao, half_w, a_front = anc["a_ao"], anc["half_w"], anc["a_front"]
    j = lambda s=5.0: rng.uniform(-s, s)  # noqa: E731
    # Stomach: fundus, body and antrum ellipsoids on one box, union of their q.
    fill = rng.uniform(0.8, 1.15)
    parts = [((a_v - 10 + j(), b0 + 58 + j(), c_cf + 72 + j()), (38, 38, 42)),
             ((a0 - 52 + j(), b0 + 48 + j(), c_cf + 45 + j()), (30, 38, 36)),
             ((a0 - 62 + j(), b0 + 5 + j(), c_cf + 22 + j()), (22, 38, 18))]
    parts = [(np.asarray(c), np.multiply(s, fill)) for c, s in parts]
    lo = np.min([c - s for c, s in parts], 0)
    hi = np.max([c + s for c, s in parts], 0)
    sl = g.box(lo, hi)
    if sl is not None:
        q = np.min([ellipsoid_on(g, sl, c, s)[1] for c, s in parts], 0)
        inside = (q <= 1 + 0.04 * wob[sl]) & cavity[sl]
        cv.paint(sl, inside, _T["gut_wall"], 6, P_STOMACH)
        lumen = inside & (q <= 0.88)
        a = g.coords(sl)[0]
        rows = np.nonzero(lumen.any(axis=(1, 2)))[0]
        if rows.size:  # supine: gas rises anteriorly (small a)
            a_air = a[rows[0], 0, 0] + rng.uniform(6, 25)
            content = _T["gut_chyme"] if rng.uniform() < 0.5 else _T["gut_fluid"]
            cv.paint(sl, lumen, content, 6, P_STOMACH)
            cv.paint(sl, lumen & (tex[sl] > 0.8), _T["gut_chyme"], 6, P_STOMACH)
            cv.paint(sl, lumen & (a < a_air), _T["gas"], 6, P_STOMACH)
    pylorus = parts[2][0] + (5, -30 * fill, -5)
    soft = (("gut_chyme", 0.55), ("gut_fluid", 0.3), ("gas_mix", 0.15))
    # Duodenum: D1 backwards from the pylorus, D2 down, D3 across between the
    # aorta and the SMA, D4 up to the duodenojejunal flexure.
    r_d = rng.uniform(9, 12)
    duo = [pylorus, (a_cf - 20 + j(), b_v - 45 + j(), c_cf + 10 + j()),
           (a_cf - 5 + j(), b_v - 57 + j(), c_cf + 3),
           (a_cf - 3 + j(), b_v - 60 + j(), c_cf - 18), (a_cf + 2, b_v - 56 + j(), c_cf - 38),
           (a_cf + 8, b_v - 42, c_cf - 54 + j()), (a_ao - 24, b_v - 15, c_cf - 60 + j()),
           (a_ao - 24, b_v + 10, c_cf - 60 + j()), (a_ao - 26, b_v + 24, c_cf - 50),
           (a_cf - 5 + j(), b_v + 32 + j(), c_cf - 32 + j())]
    _gut_tube(rng, g, cv, duo, r_d, 19, P_DUODENUM, cavity, tex, soft)
    anc["dj"] = np.array(duo[-1])
    # Small bowel: loops next to the pancreas (jejunum) and in the lower abdomen.
    near = ((a_cf - 45, b_v + 15, c_cf - 75), (a_cf + 15, b_v + 100, c_cf))
    low = ((a_front + 25, b0 - 0.75 * half_w, -128), (a0 + 10, b0 + 0.75 * half_w, c_cf - 45))
    mixed = (("gut_chyme", 0.45), ("gut_fluid", 0.35), ("gas_mix", 0.2))
    for i in range(num_loops):
        box = near if i < max(2, num_loops // 3) else low
        pts = random_walk(rng, *box, n=7, step=rng.uniform(22, 32))
        _gut_tube(rng, g, cv, pts, rng.uniform(8, 12), 18, P_BOWEL, cavity, tex, mixed)
    # Colon: ascending, hepatic flexure, transverse (sagging), splenic flexure, descending.
    lat = 0.74 * half_w
    colon = [(a0 - 10 + j(), b0 - lat, -140), (a0 - 20 + j(), b0 - lat + j(), c_cf - 40),
             (a0 - 55 + j(), b0 - lat + 10, c_cf - 5),
             (a_front + 30, b0 - 40 + j(), c_cf - 35 + j(10)),
             (a_front + 30, b0 + 40 + j(), c_cf - 30 + j(10)),
             (a0 - 40 + j(), b0 + lat - 10, c_cf + 25),
             (a0 + 5 + j(), b0 + lat + 5, c_cf - 10), (a0 + 10 + j(), b0 + lat, -140)]
    _gut_tube(rng, g, cv, colon, rng.uniform(15, 21), 20, P_COLON, cavity, tex,
              (("stool", 0.7), ("gas_mix", 0.3)))
    # Lymph nodes (soft tissue like the pancreas) along the aorta and SMA.
    for _ in range(rng.integers(3, 7)):
        if rng.uniform() < 0.6:
            base = anc["sma"][rng.integers(0, 3)]
        else:
            base = (a_ao, anc["b_ao"], c_cf + j(40))
        centre = np.asarray(base) + rng.normal(0, 1, 3) * (12, 18, 15)
        sl, q = ellipsoid(g, centre, rng.uniform(3.5, 7, 3), rotation(j(90)))
        if sl is not None:
            cv.paint(sl, (q <= 1) & cavity[sl], _T["lymph_node"], 0, P_NODE)
    # Mesenteric vessels from the SMA / SMV into the lower abdomen.
    for i in range(5):
        src = anc["sma"][2] if i % 2 else anc["smv"][1]
        end = rng.uniform(*low)
        _paint_tube(g, cv, [src, (src + end) / 2 + rng.normal(0, 10, 3), end], [2.5, 2, 1.5],
                    _T["artery"] if i % 2 else _T["portal_vein"], 0, P_MESO, clip=cavity)


def _pancreas(rng, g, cv, anc, cavity, lob, cfg: PhantomConfig):
    """Pancreas (label 7) with lobulated outline and fatty clefts, the
    splenic vein along its back and a tortuous splenic artery above it."""
    a_cf, b_cf, c_cf, b_v = anc["a_cf"], anc["b_cf"], anc["c_cf"], anc["b_v"]
    ctrl = np.array([  # uncinate, lower head, head, neck, body, body/tail, tail, tail tip
        (a_cf + 12, b_v - 6, c_cf - 36), (a_cf + 6, b_v - 26, c_cf - 30),
        (a_cf - 2, b_v - 32, c_cf - 13), (a_cf - 16, b_v - 10, c_cf),
        (a_cf - 14, b_v + 22, c_cf + 7), (a_cf - 2, b_v + 52, c_cf + 15),
        (a_cf + 16, b_v + 76, c_cf + 22), (a_cf + 28, b_v + 90, c_cf + 26)], float)
    ctrl += rng.normal(0, 3.5, ctrl.shape)
    ctrl[:, 2] += rng.uniform(-10, 14) * np.clip((ctrl[:, 1] - b_v) / 90, 0, 1)  # tail rise varies
    ctrl[:, 0] += rng.uniform(-8, 8) * np.clip((ctrl[:, 1] - b_v) / 90, 0, 1)    # tail depth varies
    radii = np.array([6.5, 10, 11.5, 7.5, 8.5, 8, 7.5, 5])
    radii[:3] *= rng.uniform(0.85, 1.2)   # head size
    radii[3:] *= rng.uniform(0.8, 1.15)   # body / tail thickness
    radii *= cfg.pancreas_scale * rng.uniform(0.9, 1.1)
    area = g.shape[0] * g.shape[1]
    for _ in range(30):  # shrink until no axial slice exceeds the configured fraction
        sl, sdf = tube(g, ctrl, radii, margin=4.0)
        mask = (sdf + 2.2 * lob[sl] <= 0) & cavity[sl] & (cv.prio[sl] <= P_PANCREAS)
        if mask.sum(axis=(0, 1)).max() <= cfg.max_pancreas_fraction * area:
            break
        radii *= 0.92
    else:
        raise RuntimeError("phantom: could not fit the pancreas under max_pancreas_fraction")
    if not mask.any():
        raise InputError(f"PhantomConfig.shape: {g.shape} is too coarse to hold a pancreas")
    cv.paint(sl, mask, _T["pancreas"], PANCREAS_ID, P_PANCREAS)
    # interlobular fat: labelled pancreas, as annotators include it
    cv.paint(sl, mask & (lob[sl] < -1.6), _T["pancreas_fat"], PANCREAS_ID, P_PANCREAS)
    # Splenic vein: from the confluence along the back of the body and tail.
    pts, rad = curve(ctrl[3:], radii[3:], 10.0)
    r_sv = rng.uniform(3.5, 5)
    vein = pts + np.c_[0.85 * rad + r_sv, np.zeros_like(rad), np.full_like(rad, 2)]
    hilum = ctrl[-1] + (14 + rng.uniform(0, 6), 10, 8)
    vein = np.vstack([(a_cf, b_cf, c_cf), vein[1::2], hilum])
    _paint_tube(g, cv, vein, np.full(len(vein), r_sv), _T["portal_vein"], 64, P_VEIN)
    # Splenic artery: wiggles along the upper border of the pancreas.
    art = pts[::2] + np.c_[rng.normal(0, 4, len(pts[::2])), np.zeros(len(pts[::2])), rad[::2] + 4]
    art = np.vstack([(anc["a_ao"] - 8, anc["b_ao"], c_cf + 14), art, hilum + (0, 0, 6)])
    _paint_tube(g, cv, art, np.full(len(art), rng.uniform(2.2, 3.2)), _T["artery"], 0, P_ARTERY)


def paint_anatomy(rng: np.random.Generator, g: Grid, cv: Canvas, wob: np.ndarray,
                  tex: np.ndarray, lob: np.ndarray, config: PhantomConfig) -> None:
    """Paints one virtual patient onto `cv` in place (tissue, label, priority).

    Args:
      rng: the case's generator; drawn from in a fixed order (the same seed
        gives the same anatomy).
      g: the patient grid of the case; cv: a fresh `Canvas` of shape g.shape.
      wob, tex, lob: float32 (X,Y,Z) smooth noise fields: organ outline wobble,
        tissue texture / content mottling, pancreas lobulation.
      config: the case's settings (reads num_bowel_loops, pancreas_scale,
        max_pancreas_fraction).

    Raises InputError when the grid is too coarse to hold a pancreas.
    """
    anc, cavity, fat = _body(rng, g, cv)
    _spine(rng, g, cv, anc, fat)
    _vessels(rng, g, cv, anc)
    _organs(rng, g, cv, anc, cavity, wob)
    _gut(rng, g, cv, anc, cavity, wob, tex, config.num_bowel_loops)
    _pancreas(rng, g, cv, anc, cavity, lob, config)
