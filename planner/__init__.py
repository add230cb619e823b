"""planner: Spec -> SignalGraph -> Plan (memory model, cost model, placement). Imports no torch or deepspeed."""
