"""Services the commands share: options, the factoring engine, the budget, plans, reports, scoring."""
