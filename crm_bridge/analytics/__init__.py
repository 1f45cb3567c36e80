"""Analytics on released data: RFM segments, association rules, customer lifetime value, churn risk.

The module reads only what the bridge releases (a table keyed by DID, carrying in its schema
metadata the purpose and attribute categories it was released for: `crm_bridge.release`), never
raw CRM data. Each method names the consent it needs and refuses to run without it; no aggregate
row that describes fewer than k customers leaves the module (`privacy`).
"""
