-- a neutralized copy (staging, test) must never take over production's broker sessions:
-- stop the service and every broker, and give each broker a client id of its own (a shared
-- client id makes the broker disconnect the other connection, production's listener included)
UPDATE mqtt_service
   SET desired_state = 'stopped';
UPDATE mqtt_broker
   SET enabled = false,
       client_id = 'mqtt-listener-' || substr(md5(random()::text || id::text), 1, 12);
