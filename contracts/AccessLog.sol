// SPDX-License-Identifier: MIT
// slither-disable-next-line pragma: OpenZeppelin's files keep their own, wider ranges
pragma solidity ^0.8.30;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IAccessLog} from "./IAccessLog.sol";
import {IConsentRegistry} from "./IConsentRegistry.sol";

/// @dev See {IAccessLog}.
contract AccessLog is IAccessLog, AccessControl {
    bytes32 public constant ACCESSOR_ROLE = keccak256("ACCESSOR_ROLE");

    IConsentRegistry private immutable _registry;
    bytes32 private _head;
    uint256 private _count;

    /**
     * @dev Grants the admin role to `admin` and the accessor role to `accessor`.
     *
     * Requirements:
     * - none of the addresses is zero.
     */
    constructor(address admin, address accessor, IConsentRegistry registry_) {
        if (admin == address(0) || accessor == address(0) || address(registry_) == address(0)) {
            revert AccessLogZeroAddress();
        }
        _registry = registry_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(ACCESSOR_ROLE, accessor);
    }

    /// @inheritdoc IAccessLog
    function record(address partner, bytes32 purpose, bytes32 requestId, Entry[] calldata entries)
        external
        onlyRole(ACCESSOR_ROLE)
        returns (uint256 permitted)
    {
        if (entries.length == 0) revert AccessLogEmptyBatch();
        uint256 first = _count;
        uint256 buffer = _request(partner, purpose, requestId);
        (bytes32 chain, bytes memory denied, uint256 allowed) = _check(buffer, entries, first);
        emit AccessBatchRecorded(first, partner, purpose, requestId, _head, chain, entries, denied);
        _head = chain;
        _count = first + entries.length;
        return allowed;
    }

    /**
     * @dev A 256-byte buffer for the hash chain's links, laid out as `abi.encode(head, index, subject,
     * partner, purpose, attributes, requestId, permitted)`, with the request's fields written once.
     * One buffer for the whole batch: `abi.encode` would allocate 256 bytes per entry that are never
     * freed, and memory costs grow with the square of its size.
     */
    function _request(address partner, bytes32 purpose, bytes32 requestId) private pure returns (uint256 buffer) {
        // slither-disable-next-line assembly: one buffer for the batch's links; abi.encode would allocate one an entry
        assembly ("memory-safe") {
            buffer := mload(0x40)
            mstore(0x40, add(buffer, 0x100))
            mstore(add(buffer, 0x60), and(partner, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(buffer, 0x80), purpose)
            mstore(add(buffer, 0xc0), requestId)
        }
    }

    /**
     * @dev Checks each entry against the registry and extends the hash chain over it (see {_request});
     * returns the new head, the bitmap of refused entries and how many were permitted.
     */
    function _check(uint256 buffer, Entry[] calldata entries, uint256 first)
        private
        view
        returns (bytes32 chain, bytes memory denied, uint256 permitted)
    {
        chain = _head;
        denied = new bytes((entries.length + 7) / 8);
        for (uint256 i = 0; i < entries.length; ++i) {
            bytes32 subject = entries[i].subject;
            uint256 attributes = entries[i].attributes;
            bool allowed = _permitted(buffer, subject, attributes);
            // slither-disable-next-line assembly: hashes the link in the batch's buffer (see {_request})
            assembly ("memory-safe") {
                mstore(buffer, chain)
                mstore(add(buffer, 0x20), add(first, i))
                mstore(add(buffer, 0x40), subject)
                mstore(add(buffer, 0xa0), attributes)
                mstore(add(buffer, 0xe0), allowed)
                chain := keccak256(buffer, 0x100)
            }
            if (allowed) {
                ++permitted;
            } else {
                denied[i >> 3] |= bytes1(uint8(1) << uint8(i & 7));
            }
        }
    }

    /// @dev Whether the registry permits `attributes` of `subject` for the request in `buffer`.
    function _permitted(uint256 buffer, bytes32 subject, uint256 attributes) private view returns (bool) {
        address partner;
        bytes32 purpose;
        // slither-disable-next-line assembly: the request's fields, from the batch's buffer (see {_request})
        assembly ("memory-safe") {
            partner := mload(add(buffer, 0x60))
            purpose := mload(add(buffer, 0x80))
        }
        return _registry.isPermitted(subject, partner, purpose, attributes);
    }

    /// @inheritdoc IAccessLog
    function head() external view returns (bytes32) {
        return _head;
    }

    /// @inheritdoc IAccessLog
    function count() external view returns (uint256) {
        return _count;
    }

    /// @inheritdoc IAccessLog
    function registry() external view returns (address) {
        return address(_registry);
    }
}
