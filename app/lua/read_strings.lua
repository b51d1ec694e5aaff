#!lua flags=no-writes,allow-cross-slot-keys
-- read_strings: several string keys of one Redis Cluster node, of any of its slots, in
-- one call: the cluster gateway's read_strings_with (app/cluster_gateway.py; the
-- catalogue's page check reads its 128 partitions' clocks so), where an MGET may name
-- one slot only and a GET each costs the client far more than the node. Read-only.
-- A node answers CROSSSLOT to declared keys of several slots, so only the first is
-- declared (its slot routes the call) and the rest come in ARGV; allow-cross-slot-keys
-- lets the script read them, and the node refuses one it does not serve (moved away, or
-- migrating): an error reply, never a silent nil.
--
-- KEYS[1]  the first key
-- ARGV[1..n]  the other keys, all served by the same node
--
-- Returns: the n + 1 values in order, a missing key as a nil bulk reply.

local values = {redis.call('GET', KEYS[1])}
for i = 1, #ARGV do
  values[i + 1] = redis.call('GET', ARGV[i])
end
return values
