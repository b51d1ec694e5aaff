"""PhoneShop: an order-processing backend whose money and stock live in Redis Lua scripts."""
