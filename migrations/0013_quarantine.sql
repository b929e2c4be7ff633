-- Until when a node is out of rotation: a quarantine outlives the server that decided it
-- (a restart, or another server of the network the node moves to reads it when it joins).
ALTER TABLE nodes ADD COLUMN quarantined_until TIMESTAMPTZ;
