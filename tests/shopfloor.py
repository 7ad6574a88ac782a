"""Thirty tasks of one domain (a pump manufacturer's support desk and shop floor), written for the tests
the way a team would collect them: short, concrete, each with the answer they want."""

from __future__ import annotations

import csv
from pathlib import Path

TASKS: list[tuple[str, str]] = [
    ("What does error code E14 on the CP-200 controller mean?",
     "E14 means the motor temperature sensor reads open circuit. Check the sensor plug on the terminal board, "
     "then measure the sensor: about 1 kOhm at room temperature is normal."),
    ("How do I reset the overload relay on a P-40 pump?",
     "Switch the pump off at the isolator, wait one minute, then press the blue reset button on the relay "
     "until it clicks. If it trips again within ten minutes, call service."),
    ("Write a short email to a customer confirming that their replacement impeller ships on Friday.",
     "Dear customer, your replacement impeller (part IM-40-3) leaves our warehouse this Friday. You will "
     "receive the tracking number by email the same day. Kind regards, Support"),
    ("Rewrite this note in plain language: 'Pump cavitation observed due to insufficient NPSH.'",
     "The pump is making bubbles and noise because the water pressure at its inlet is too low."),
    ("Classify this ticket as warranty, repair or question: 'My pump stopped after two months.'",
     "warranty"),
    ("Extract the serial number from: 'Unit P40-2231-B, installed 2024, serial SN 88412, site Bremen.'",
     "SN 88412"),
    ("A tank holds 1200 litres and the pump moves 40 litres per minute. How long does it take to empty?",
     "1200 / 40 = 30 minutes."),
    ("Write a Python function that converts bar to psi.",
     "def bar_to_psi(bar):\n    return bar * 14.5038"),
    ("How often should the mechanical seal on a P-40 be inspected?",
     "Every 2000 operating hours, or every six months, whichever comes first."),
    ("How do I bleed air from the suction line after a seal change?",
     "Open the vent screw on the pump housing, fill the casing with water until it flows out without "
     "bubbles, close the screw, then start the pump with the discharge valve half open."),
    ("Why does the CP-200 display show 'LOW FLOW' at start-up?",
     "The flow switch needs about 20 seconds to see flow after start. If the message stays, check that the "
     "suction valve is open and the strainer is clean."),
    ("Summarize this shift report: 'Line 2 stopped 40 min for a belt change, output 310 units, no injuries.'",
     "Line 2 made 310 units; a belt change stopped it for 40 minutes; no injuries."),
    ("What torque is used for the casing bolts on the P-40?",
     "45 Nm, tightened crosswise in two passes."),
    ("Classify this part request by urgency (high, normal, low): 'Line is down, need a seal kit today.'",
     "high"),
    ("Write a checklist for starting the P-40 after winter storage.",
     "1. Check the shaft turns freely by hand. 2. Fill the casing with water. 3. Open the suction valve. "
     "4. Start with the discharge valve half open. 5. Listen for noise and check for leaks."),
    ("How do I change the operating language of the CP-200 controller?",
     "Hold MENU for three seconds, choose Settings > Language, pick the language with the arrows and press OK."),
    ("Explain the difference between a single and a double mechanical seal for a new technician.",
     "A single seal has one pair of sealing faces. A double seal has two pairs with a barrier fluid between "
     "them, so the pumped liquid cannot escape even if one pair wears."),
    ("Extract the fault and the date from: 'On 12 March the drive reported overcurrent twice.'",
     "Fault: overcurrent. Date: 12 March."),
    ("The motor draws 7.5 kW for 6 hours a day. How many kWh is that per week?",
     "7.5 x 6 x 7 = 315 kWh per week."),
    ("Write a SQL query that counts open tickets per product from a table tickets(product, status).",
     "SELECT product, COUNT(*) FROM tickets WHERE status = 'open' GROUP BY product;"),
    ("What should I do if the pump leaks at the shaft?",
     "A few drops per hour are normal while a new seal beds in. A steady drip means the seal is worn: stop "
     "the pump and replace the seal kit SK-40."),
    ("Rewrite this instruction so a customer can follow it: 'Actuate isolator, then depress RST.'",
     "Turn the main switch off, then press the reset button."),
    ("How do I read the operating hours counter on the CP-200?",
     "Press INFO twice; the display shows the hours run since installation."),
    ("Which grease is approved for the P-40 motor bearings?",
     "Lithium-complex grease of NLGI grade 2, for example the one in service kit GK-2."),
    ("Write a one-paragraph safety reminder for the night shift about lockout before maintenance.",
     "Before you open any pump or panel, switch it off, lock the isolator with your own padlock and tag it "
     "with your name. Test that it cannot start. Only then start work, and remove only your own lock."),
    ("Classify this message as complaint or praise: 'The new controller is much quieter, thanks.'",
     "praise"),
    ("What is the maximum fluid temperature for the P-40?",
     "90 degrees Celsius with the standard seal, 120 with the high-temperature seal kit."),
    ("How do I export the alarm log from the CP-200 to a USB stick?",
     "Insert the stick, hold INFO for three seconds and choose Export log. The file alarms.csv is written "
     "to the stick in about ten seconds."),
    ("A pump runs at 2900 rpm with a 50 Hz supply. What speed does it run at on 60 Hz?",
     "2900 x 60 / 50 = 3480 rpm."),
    ("Give three reasons a pump may not reach its rated pressure.",
     "A worn impeller, air in the suction line, or a partly closed or blocked suction strainer."),
]


def write_csv(path: Path, rows=TASKS) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "answer"])
        writer.writerows(rows)
    return path


def write_seeds(path: Path, rows=TASKS) -> Path:
    """The tasks as a seed/reference file (Alpaca shape), ids task-001..."""
    import json
    path.write_text("".join(json.dumps({"id": f"task-{i:03d}", "instruction": q, "input": "", "output": a}) + "\n"
                            for i, (q, a) in enumerate(rows, 1)))
    return path


# Probing candidates of a run written by hand: code helps, how-to is neutral, classification hurts.
MEASURED = [
    ("Write a Python function that converts litres per minute to cubic metres per hour.", "def f(x): return x * 0.06", 0.8),
    ("Write a Python script that reads the CP-200 alarm log and counts alarms per day.", "import csv ...", 0.7),
    ("Write a SQL query that lists pumps whose seal was changed more than twice.", "SELECT ...", 0.6),
    ("Write a Python function that checks whether a torque value is within 10% of 45 Nm.", "def ok(t): ...", 0.5),
    ("How do I replace the strainer on a P-40 pump?", "Close both valves, open the cover, swap the strainer.", 0.05),
    ("How do I calibrate the flow switch on the CP-200?", "Hold SET for five seconds while the pump runs.", 0.0),
    ("How do I drain the casing before winter?", "Open the drain plug at the bottom of the casing.", -0.05),
    ("How do I check the motor rotation direction?", "Start briefly and compare with the arrow on the fan cover.", 0.02),
    ("Classify this ticket as warranty or repair: 'The seal leaks after one year.'", "repair", -0.6),
    ("Classify this message as complaint or praise: 'Delivery took three weeks.'", "complaint", -0.7),
    ("Classify this request by urgency: 'Spare impeller for next month.'", "low", -0.5),
    ("Classify this call as sales or support: 'My display shows E14.'", "support", -0.8),
]
# The seed each group was prompted from (its nearest shown example): task-008 (Python), task-002 (how-to),
# task-005 (classification); every prompt also shows task-001 first.
SEED_OF = {0: "task-008", 4: "task-002", 8: "task-005"}


def make_measured_run(root: Path) -> Path:
    """A finished-looking run directory (one round) with 12 measured probing candidates, 2 warm-up pairs,
    one invalid influence value and 3 training pairs from the updated teacher."""
    from montessori.records import Candidate, InfluenceResult, Pair
    from montessori.store import RunStore, atomic_write_json, atomic_write_text, write_jsonl
    root.mkdir(parents=True, exist_ok=True)
    seeds = write_seeds(root / "seeds.jsonl")
    atomic_write_text(root / "config.resolved.yaml", f"name: handmade\ndata:\n  seeds: {seeds}\n")
    store = RunStore(root)
    warm = [("How do I read the hours counter?", "Press INFO twice."), ("What is E14?", "A sensor fault.")]
    rows = [(q, a, None) for q, a in warm] + MEASURED
    candidates, pairs = [], []
    for i, (q, a, _) in enumerate(rows):
        cid = f"r1-p{i:05d}-s0"
        seed = SEED_OF[max(k for k in SEED_OF if k <= max(i - 2, 0))]
        candidates.append(Candidate(id=cid, prompt_id=f"r1-p{i:05d}", completion=q, instruction=q, round=1,
                                    example_ids=["task-001", seed, "task-030", "r1-p00000-s0"]))
        pairs.append(Pair(id=cid, instruction=q, response=a, candidate_id=cid, prompt_id=f"r1-p{i:05d}"))
    write_jsonl(store.stage(1, "instructions").file("candidates.jsonl"), candidates)
    write_jsonl(store.stage(1, "responses").file("pairs.jsonl"), pairs)
    store.stage(1, "responses").write_manifest(fingerprint="f", config_hash="c", inputs={}, counts={},
                                               started=0.0, extra={"teacher": "tiny-random:0"})
    ids = [c.id for c in candidates]
    atomic_write_json(store.stage(1, "warmup").file("split.json"), {"warmup": ids[:2], "probing": ids[2:]})
    results = [InfluenceResult(id=cid, influence=v, ref_loss_before=2.0, ref_loss_after=2.0 - v)
               for cid, (_, _, v) in zip(ids[2:], MEASURED)]
    results.append(InfluenceResult(id="r1-p09999-s0", influence=None, ref_loss_before=2.0, ref_loss_after=None,
                                   status="non_finite_loss"))
    write_jsonl(store.stage(1, "influence").file("influence.jsonl"), results)
    data = [Pair(id=f"r1-data-p{i:05d}-s0", instruction=q, response=a) for i, (q, a) in enumerate(TASKS[:3])]
    write_jsonl(store.stage(1, "dataset").file("pairs.jsonl"), data)
    store.stage(1, "dataset").write_manifest(fingerprint="f", config_hash="c", inputs={}, counts={}, started=0.0,
                                          extra={"teacher": str(root / "round-1" / "dpo" / "model")})
    return root
